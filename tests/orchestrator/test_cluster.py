"""The ports of presso's own local Ray: configurable, and free ones by default."""

import socket

import pytest

from presso import ConfigError
from presso.orchestrator.cluster import local_ray_ports
from presso.orchestrator.config import load_config


def test_local_ray_ports_are_the_configured_ones_or_free_ones():
    """Ray's fixed defaults may be held by another Ray on the machine; presso picks free ports
    unless the config names them (ray.dashboard_port, ray.metrics_export_port)."""
    assert local_ray_ports(8300, 8301) == {"dashboard_port": 8300, "_metrics_export_port": 8301}
    chosen = local_ray_ports(0, 0)
    for port in chosen.values():
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # free when chosen
    cfg = load_config("jobs/quickstart.yaml", ["ray.dashboard_port=8300"])
    assert (cfg.ray.dashboard_port, cfg.ray.metrics_export_port) == (8300, 0)


@pytest.mark.parametrize("value", ["-1", "65536"])
def test_a_port_out_of_range_is_refused_up_front(value):
    with pytest.raises(ConfigError, match="ray.dashboard_port: expected 0"):
        load_config("jobs/quickstart.yaml", [f"ray.dashboard_port={value}"])
