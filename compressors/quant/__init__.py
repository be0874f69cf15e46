"""Weight quantizers (RTN, GPTQ, AWQ, SpQR, AdaDim) and the grid arithmetic they share."""
