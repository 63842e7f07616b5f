"""What tracking records as params: flattened dotted keys, no secrets, no passwords inside URLs; W&B's mode."""

from __future__ import annotations

from pathlib import Path

from sftray.config import compose_config
from sftray.tracking.mlflow_logger import flatten, redact, trial_params
from sftray.tracking.wandb_logger import wandb_mode

CONF = Path(__file__).resolve().parents[2] / "conf"


def test_flatten_gives_dotted_keys_for_the_whole_config(tmp_path):
    cfg = compose_config(
        ["train.lora.r=4", "tracking.uri=http://alice:s3cret@mlflow.internal:5000"], conf=CONF, base=tmp_path
    )
    params = flatten(cfg)
    assert params["train.lora.r"] == 4 and params["sweep.name"] == "demo"
    assert params["tracking.uri"] == "http://alice:***@mlflow.internal:5000"
    assert not any("s3cret" in str(v) for v in params.values())


def test_secret_keys_are_dropped_and_url_passwords_masked():
    params = flatten({"wandb": {"api_key": "k", "project": "p"}, "hub_token": "t", "db": {"password": "x"}})
    assert params == {"wandb.project": "p"}
    assert redact("postgresql://u:pw@db:5432/mlflow") == "postgresql://u:***@db:5432/mlflow"
    assert redact("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db" and redact(3) == 3


def test_wandb_is_offline_without_credentials(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert wandb_mode() == "offline"
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    assert wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() == "disabled"


def test_a_trials_params_are_flattened_like_the_config_whatever_set_them(tmp_path):
    # MLflow and W&B record the same params: a point's list value is JSON like the config's lists, and a URL's
    # password is masked even when a sweep point (not the config) sets it.
    cfg = compose_config(
        [
            "+sweep.points=[{train.lora.target_modules: [q_proj, v_proj], tracking.uri: 'http://a:pw@h:5000'}]",
            "+sweep.params.train.lora.r=[4,8]",
        ],
        conf=CONF,
        base=tmp_path,
    )
    params = trial_params(cfg, {"sweep.point": 0, "train.lora.r": 8, "train.lr": 0.001})
    assert params["train.lora.target_modules"] == '["q_proj", "v_proj"]'
    assert params["tracking.uri"] == "http://a:***@h:5000"
    assert params["train.lora.r"] == 8 and params["train.lr"] == 0.001 and params["sweep.name"] == "demo"
    assert "sweep.point" not in params
