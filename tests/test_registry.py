"""The generic Registry (facesiam/registry.py) and how config, --help and errors read the registries."""

from __future__ import annotations

import pytest

from facesiam import config
from facesiam.commands.train import parser
from facesiam.errors import InputError
from facesiam.registry import Registry


def _widgets() -> Registry:
    widgets = Registry("widget")

    @widgets.register("round", shape="circle")
    def _round(size: int) -> str:
        """A round widget.

        More words that --help does not show.
        """
        return f"round {size}"

    widgets.register("square", lambda size: f"square {size}", doc="A square widget", shape="box")
    return widgets


def test_register_as_decorator_and_as_call():
    widgets = _widgets()
    assert widgets.names() == ("round", "square"), "registration order"
    assert widgets.get("round").build(3) == "round 3" and widgets.get("square").build(2) == "square 2"
    assert widgets.get("round").doc == "A round widget.", "the docstring's first line by default"
    assert widgets.get("square").info["shape"] == "box"
    assert widgets.names(shape="circle") == ("round",)
    assert "round" in widgets and "oval" not in widgets and ["round"] not in widgets
    assert widgets.describe() == "round: A round widget; square: A square widget"


def test_unknown_name_is_one_line_listing_the_known_ones():
    with pytest.raises(InputError) as err:
        _widgets().get("oval")
    assert str(err.value) == "unknown widget 'oval'; choose one of round, square"
    with pytest.raises(InputError, match="unknown widget"):
        _widgets().get(["not", "a", "name"])  # an unhashable YAML value


def test_a_name_registered_twice_is_refused():
    widgets = _widgets()
    with pytest.raises(ValueError, match="already registered"):
        widgets.register("round", lambda size: "another")
    assert widgets.get("round").build(1) == "round 1"


def test_entry_info_is_read_only():
    with pytest.raises(TypeError):
        _widgets().get("round").info["shape"] = "square"


def test_choices_come_from_the_registries():
    for key, registry in config.REGISTRIES.items():
        assert config.CHOICES[key] == registry.names(), key
        assert len(registry) > 0
    assert config.CHOICES["loss.pair_loss"] == ("none",) + config.LOSSES.names(family="pair")
    assert config.CHOICES["model.head"] == ("linear", "face"), "Literal fields list their values"
    assert config.CHOICES["wandb"] == (None, "off", "offline", "online")


@pytest.mark.parametrize("values,message", [
    ({"optim": {"scheduler": "cosin"}}, "config key 'optim.scheduler': unknown scheduler 'cosin'; choose one of "
                                        "cosine_epoch, cosine, step, plateau, constant, poly"),
    ({"best_metric": "eer"}, "config key 'best_metric': unknown selection metric 'eer'; choose one of "
                             "tar_at_far_1e-03, auc, rank1, map_at_r, neg_eer, teacher_cosine, or bin:NAME (a --val-bin set)"),
    ({"loss": {"miner": "easy"}}, "config key 'loss.miner': unknown miner 'easy'; choose one of "
                                  "none, semihard, hard, multisimilarity"),
    ({"model": {"head": "mlp"}}, "config key 'model.head' is 'mlp'; choose one of linear, face"),
    ({"wandb": "upload"}, "config key 'wandb' is 'upload'; choose one of off, offline, online"),
])
def test_unknown_names_in_a_config_are_one_line_errors(values, message):
    with pytest.raises(InputError) as err:
        config.config_from_dict(values)
    assert str(err.value) == message


def test_help_lists_the_choices_and_a_typo_is_refused_with_them(capsys):
    text = parser().format_help()
    assert "--scheduler {cosine_epoch,cosine,step,plateau,constant,poly}" in text
    assert "--wandb {none,off,offline,online}" in text
    assert "plateau: ReduceLROnPlateau" in " ".join(text.split()), "each entry's one-line doc"
    with pytest.raises(SystemExit):
        parser().parse_args(["--optimizer", "adam"])
    assert "invalid choice: 'adam'" in capsys.readouterr().err


def test_flags_with_choices_still_reach_the_config():
    from facesiam.commands.train import config_from_args

    cfg = config_from_args(parser().parse_args(["--wandb", "none", "--head", "face", "--scheduler", "plateau"]))
    assert (cfg.wandb, cfg.model.head, cfg.optim.scheduler) == (None, "face", "plateau")
