from pathlib import Path

from agent import config as cfg

ROOT = Path(__file__).resolve().parents[2]


def test_example_config_lists_every_default():
    """systemd/hostagent.toml.example loads and equals the built-in defaults."""
    example = cfg.load(ROOT / "systemd" / "hostagent.toml.example")
    assert example == cfg.Config()
