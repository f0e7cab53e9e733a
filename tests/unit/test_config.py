import tomllib

import pytest

from agent import config as cfg


def test_defaults_validate():
    c = cfg.load(cfg.Path("/nonexistent/hostagent.toml"))
    assert c.server.port == 54321 and c.server.tls
    assert c.server.host == "0.0.0.0"


def test_file_and_dropins_in_order(tmp_path):
    main = tmp_path / "hostagent.toml"
    main.write_text('[server]\nport = 1234\n[jobs]\nmax_running = 3\n')
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "20-b.toml").write_text("[server]\nport = 3000\n")
    (tmp_path / "conf.d" / "10-a.toml").write_text("[server]\nport = 2000\n"
                                                   "[logging]\nlevel = 'DEBUG'\n")
    c = cfg.load(main)
    assert c.server.port == 3000          # 20-b after 10-a after the main file
    assert c.jobs.max_running == 3
    assert c.logging.level == "DEBUG"


@pytest.mark.parametrize("text, message", [
    ("[server]\nprot = 1\n", "server.prot: unknown setting"),
    ("[nosuch]\nx = 1\n", "nosuch: unknown setting"),
    ("[server]\nport = '1'\n", "server.port: expected int, got str"),
    ("[server]\nport = 70000\n", "server.port"),
    ("[server]\ntls = false\n", "plain HTTP is allowed only on loopback"),
    ("[server\n", "hostagent.toml"),
    ("[thin]\nchunk_size = 1048576\n", "thin.chunk_size: 1048576 must be at least"),
    ("[thin]\nchunk_size = 268435457\n", "thin.chunk_size"),
    ("[thin]\nwatermark_percent = 0\n", "thin.watermark_percent: 0 must be at least 1"),
    ("[thin]\nwatermark_percent = 100\n", "thin.watermark_percent"),
])
def test_bad_config_names_the_key(tmp_path, text, message):
    path = tmp_path / "hostagent.toml"
    path.write_text(text)
    with pytest.raises(cfg.ConfigError, match=message.replace(".", r"\.")):
        cfg.load(path)


def test_plain_http_on_loopback_allowed(tmp_path):
    path = tmp_path / "hostagent.toml"
    path.write_text("[server]\ntls = false\nhost = '127.0.0.1'\n")
    assert cfg.load(path).server.tls is False


def test_show_config_is_toml_that_loads_back(tmp_path):
    c = cfg.load(tmp_path / "none.toml", cfg.dev_overrides(tmp_path / "state", 5555))
    text = c.to_toml()
    data = tomllib.loads(text)
    assert data["server"]["port"] == 5555
    path = tmp_path / "again.toml"
    path.write_text(text)
    assert cfg.load(path) == c


def test_every_number_has_a_range():
    numbers = {name for name, declared, _ in cfg.settings(cfg.Config())
               if cfg.is_number(declared)}
    assert "storage.monitor_interval" in numbers
    assert numbers == set(cfg.RANGES)


@pytest.mark.parametrize("text, message", [
    ("[storage]\nblock_extent_size = 0\n", "storage.block_extent_size: 0 must be at least"),
    ("[storage]\nmonitor_interval = 0\n", "storage.monitor_interval: 0.0 must be more than 0"),
    ("[storage]\nio_timeout = -1\n", "storage.io_timeout: -1.0 must be more than 0"),
    ("[jobs]\nprogress_interval = 0\n", "jobs.progress_interval: 0.0 must be more than 0"),
    ("[ovf]\nmax_tar_size = 0\n", "ovf.max_tar_size: 0 must be at least"),
    ("[server]\nmax_ws_clients = 0\n", "server.max_ws_clients: 0 must be at least 1"),
    ("[leases]\nhost_id = 2001\n", "leases.host_id: 2001 must be at most 2000"),
    ("[transfers]\nticket_lifetime = 0\n", "transfers.ticket_lifetime: 0.0 must be at least 1"),
    ("[transfers]\ninactivity_timeout = 120\nmax_inactivity_timeout = 60\n",
     "transfers.inactivity_timeout: more than transfers.max_inactivity_timeout"),
    ("[storage]\nmonitor_interval = true\n", "storage.monitor_interval: expected float"),
    ("[leases]\nbackends = 'local'\n", "leases.backends: expected a list of strings"),
])
def test_numbers_out_of_range_name_the_key(tmp_path, text, message):
    path = tmp_path / "hostagent.toml"
    path.write_text(text)
    with pytest.raises(cfg.ConfigError, match=message.replace(".", r"\.")):
        cfg.load(path)


def test_missing_config_file_is_an_error(tmp_path, capsys):
    from agent import daemon
    missing = tmp_path / "nosuch.toml"
    assert daemon.main(["--config", str(missing), "--show-config"]) == 2
    assert f"--config {missing}: no such file" in capsys.readouterr().err
    # without --config, a missing default file means the defaults
    assert daemon.main(["--dev", "--state-dir", str(tmp_path), "--show-config"]) == 0
