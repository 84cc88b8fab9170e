"""Config: YAML + flags resolve in order, unknown keys are errors, every experiment file parses."""

from pathlib import Path

import pytest
import yaml

from facesiam.commands.train import config_from_args, parser
from facesiam.config import TrainConfig, config_from_dict, save_yaml, to_dict

LAUNCH = Path(__file__).resolve().parents[1] / "launch" / "configs"


def _parse(argv):
    return config_from_args(parser().parse_args(argv))


def test_flags_override_yaml(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("model:\n  backbone: resnet18\n  embedding_dim: 128\noptim:\n  lr: 0.01\nbatch_size: 16\n")
    cfg = _parse(["--config", str(f), "--lr", "0.5", "--m-per-class", "2"])
    assert (cfg.model.backbone, cfg.model.embedding_dim, cfg.optim.lr, cfg.batch_size, cfg.m_per_class) == \
        ("resnet18", 128, 0.5, 16, 2)


@pytest.mark.parametrize("text,match", [("model:\n  backbon: x\n", "unknown key 'model.backbon'"),
                                        ("lr: 0.1\n", "did you mean 'optim.lr'"),
                                        ("batch_size: many\n", "expected int"),
                                        ("loss:\n  loss: hinge\n", "choose one of")])
def test_bad_config_is_a_clear_error(tmp_path, text, match):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ValueError, match=match):
        _parse(["--config", str(f)])


def test_saved_config_round_trips(tmp_path):
    cfg = _parse(["--backbone", "test_efficientnet", "--crop-scale", "0.5,1.0", "--center-crop", "0.6"])
    save_yaml(cfg, tmp_path / "config.yaml")
    again = config_from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert to_dict(again) == to_dict(cfg)


@pytest.mark.parametrize("path", sorted(LAUNCH.glob("*.yaml")), ids=lambda p: p.name)
def test_experiment_configs_parse(path):
    """Every launch config parses, and every value it sets is the value the run gets (none lost or renamed)."""
    got = to_dict(_parse(["--config", str(path)]))

    def leaves(d: dict, prefix: str = ""):
        for k, v in d.items():
            yield from leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [(f"{prefix}{k}", v)]

    written = dict(leaves(yaml.safe_load(path.read_text())))
    assert written, f"{path.name} sets nothing"
    for key, value in written.items():
        field = got
        for part in key.split("."):
            field = field[part]
        assert (list(field) if isinstance(value, list) else field) == value, key


def test_seed_config_is_the_article_recipe():
    cfg = _parse(["--config", str(LAUNCH / "seed.yaml")])
    assert cfg.model.backbone == "tf_efficientnetv2_b0" and cfg.model.embedding_dim == 512
    assert cfg.model.head == "linear" and cfg.model.image_size == 224
    assert (cfg.loss.loss, cfg.loss.margin, cfg.loss.distance, cfg.loss.miner) == ("triplet", 0.1, "cosine", "none")
    assert (cfg.m_per_class, cfg.batch_size) == (4, 32)
    o = cfg.optim
    assert (o.optimizer, o.lr, o.weight_decay, o.eps, o.scheduler, o.t_max, o.eta_min) == \
        ("adamw", 1e-4, 1e-5, 1e-8, "cosine_epoch", 50, 1e-6)
    a = cfg.augment
    assert (a.crop_scale, a.rotation, a.hflip) == ((0.8, 1.0), 15.0, 0.5) and a.color_jitter > 0
    assert TrainConfig().model.backbone == cfg.model.backbone  # defaults are the seed recipe
