"""Per-layer settings under a global budget: the knapsack solver shared by L-GreCo and the
weight-budget planner, the weight candidates, and the planner itself."""
