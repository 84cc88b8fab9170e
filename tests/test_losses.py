"""Losses under DDP: two gloo processes must produce exactly the single-process gradient of the global batch."""

import numpy as np
import pytest
import torch

from facesiam.config import LossConfig, config_from_dict
from facesiam.errors import InputError
from facesiam.losses import LOSSES, MINERS, Criterion, build_miner, build_pml_loss

from .conftest import run_distributed

DIM, CLASSES, BATCH = 8, 6, 16


def _problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, 12, generator=g)
    labels = torch.arange(BATCH) // 2 % CLASSES  # pairs of images per identity
    return x, labels


def _config(loss_name: str, miner: str = "none") -> LossConfig:
    """'arcface+multisimilarity' is arcface with a multisimilarity pair term (weight 0.5)."""
    loss, _, pair = loss_name.partition("+")
    return LossConfig(loss=loss, miner=miner, margin=None if loss != "triplet" else 0.1,
                      pair_loss=pair or "none", pair_loss_weight=0.5)


def _make(loss_name: str, miner: str = "none"):
    torch.manual_seed(0)
    net = torch.nn.Linear(12, DIM)
    crit = Criterion(_config(loss_name, miner), DIM, CLASSES)
    return torch.nn.ModuleDict({"net": net, "crit": crit})


def _forward(module, x, labels):
    emb = torch.nn.functional.normalize(module["net"](x), dim=-1)
    return module["crit"](emb, labels)


def _single(loss_name: str, miner: str):
    module = _make(loss_name, miner)
    x, labels = _problem()
    loss, value = _forward(module, x, labels)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in module.named_parameters()}
    return float(value), grads, _after_sgd_step(module)


def _after_sgd_step(module) -> dict:
    """Every parameter after one plain SGD step on the gradients just computed."""
    torch.optim.SGD(module.parameters(), lr=0.5).step()
    return {k: p.detach().clone().numpy() for k, p in module.named_parameters()}


def _ddp_worker(rank, world, loss_name, miner):
    module = _make(loss_name, miner)
    x, labels = _problem()
    part = slice(rank * BATCH // world, (rank + 1) * BATCH // world)

    class Wrapper(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, xx, ll):
            return self.m["crit"](torch.nn.functional.normalize(self.m["net"](xx), dim=-1), ll)

    wrapped = torch.nn.parallel.DistributedDataParallel(Wrapper(module))
    loss, value = wrapped(x[part], labels[part])
    loss.backward()
    grads = {k.removeprefix("m."): p.grad.clone() for k, p in wrapped.module.named_parameters()}
    return float(value), {k: v.numpy() for k, v in grads.items()}, _after_sgd_step(module)


@pytest.mark.parametrize("loss_name,miner", [("triplet", "none"), ("multisimilarity", "multisimilarity"),
                                             ("contrastive", "none"), ("arcface", "none"),
                                             ("subcenter_arcface+multisimilarity", "multisimilarity")])
def test_two_process_gradient_equals_global_batch_gradient(loss_name, miner):
    single_value, single_grads, single_after = _single(loss_name, miner)
    results = run_distributed(_ddp_worker, 2, loss_name, miner)
    for value, grads, _ in results:
        if "arcface" not in loss_name:  # pair losses see the global batch: the logged value is the global loss
            assert value == pytest.approx(single_value, rel=1e-5, abs=1e-6)
        for name, g in single_grads.items():
            np.testing.assert_allclose(grads[name], g.numpy(), rtol=1e-4, atol=1e-6, err_msg=f"{loss_name}: {name}")
    # The class centres (margin losses), trained on each rank's local batch, are identical on both ranks after a step
    # on the all-reduced gradient, and equal to the single process's.
    centres = [k for k in single_after if k.startswith("crit.") and "W" in k.split(".")[-1]]
    assert bool(centres) == ("arcface" in loss_name)
    for key in centres:
        np.testing.assert_array_equal(results[0][2][key], results[1][2][key], err_msg=key)
        np.testing.assert_allclose(results[0][2][key], single_after[key], rtol=1e-4, atol=1e-6, err_msg=key)
        assert not np.allclose(single_after[key], _make(loss_name, miner).state_dict()[key].numpy()), "centres moved"


def test_arcface_value_is_mean_of_rank_values():
    single_value, _, _ = _single("arcface", "none")
    values = [v for v, _, _ in run_distributed(_ddp_worker, 2, "arcface", "none")]
    assert np.mean(values) == pytest.approx(single_value, rel=1e-5)


def test_seed_loss_is_triplet_margin_cosine():
    loss = build_pml_loss(LossConfig(), 512, 10)
    assert type(loss).__name__ == "TripletMarginLoss" and loss.margin == pytest.approx(0.1)
    assert type(loss.distance).__name__ == "CosineSimilarity"


@pytest.mark.parametrize("name", LOSSES.names())
def test_every_loss_trains_a_step(name):
    module = _make(name)
    x, labels = _problem()
    loss, value = _forward(module, x, labels)
    assert torch.isfinite(loss) and loss.requires_grad
    loss.backward()
    assert module["net"].weight.grad.abs().sum() > 0
    assert (len(list(module["crit"].parameters())) > 0) == (LOSSES.get(name).info["family"] == "margin")


def test_margin_plus_pair_loss_is_the_weighted_sum_of_the_two_pml_losses():
    module = _make("subcenter_arcface+multisimilarity", "multisimilarity")
    x, labels = _problem()
    emb = torch.nn.functional.normalize(module["net"](x), dim=-1)
    loss, value = module["crit"](emb, labels)
    # Independently: PML's SubCenterArcFace with the same centres, plus 0.5 x MultiSimilarity on MS-mined pairs.
    from pytorch_metric_learning import losses as pml_losses, miners as pml_miners
    arc = pml_losses.SubCenterArcFaceLoss(num_classes=CLASSES, embedding_size=DIM)
    arc.load_state_dict(module["crit"].loss.state_dict())
    ms = pml_losses.MultiSimilarityLoss()
    expected = arc(emb, labels) + 0.5 * ms(emb, labels, pml_miners.MultiSimilarityMiner()(emb, labels))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6) and value.item() == pytest.approx(expected.item(), rel=1e-6)
    assert module["crit"].name == "subcenter_arcface+0.5*multisimilarity"


@pytest.mark.parametrize("cfg", [LossConfig(loss="triplet", pair_loss="multisimilarity"),
                                 LossConfig(loss="arcface", miner="semihard")])
def test_bad_loss_combinations_are_refused(cfg):
    with pytest.raises(ValueError, match="pair_loss"):
        Criterion(cfg, DIM, CLASSES)


@pytest.mark.parametrize("loss_name,subcenters", [("arcface", 1), ("subcenter_arcface", 3), ("cosface", 1)])
def test_imprinted_centres_point_at_class_means_and_keep_their_norms(loss_name, subcenters):
    torch.manual_seed(0)
    crit = Criterion(LossConfig(loss=loss_name, margin=None, subcenters=subcenters), DIM, CLASSES)
    W0 = crit.loss.W.detach().clone()
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(40, DIM, generator=g)
    labels = torch.randint(0, CLASSES - 1, (40,), generator=g)  # the last class has no images
    labels[:CLASSES - 1] = torch.arange(CLASSES - 1)
    assert crit.imprint_centres(emb, labels) == CLASSES - 1
    W = crit.loss.W.detach().numpy()
    unit = emb.numpy() / np.linalg.norm(emb.numpy(), axis=1, keepdims=True)
    for c in range(CLASSES):
        cols = slice(c * subcenters, (c + 1) * subcenters)
        np.testing.assert_allclose(np.linalg.norm(W[:, cols], axis=0), np.linalg.norm(W0[:, cols].numpy(), axis=0),
                                   rtol=1e-5)
        if c == CLASSES - 1:
            np.testing.assert_array_equal(W[:, cols], W0[:, cols].numpy())
            continue
        mean = unit[labels.numpy() == c].mean(0)
        cosines = mean @ W[:, cols] / np.linalg.norm(mean) / np.linalg.norm(W[:, cols], axis=0)
        if subcenters == 1:
            np.testing.assert_allclose(cosines, 1.0, atol=1e-5)
        else:  # close to the mean, but not identical to each other
            assert (cosines > 0.99).all() and (cosines < 1 - 1e-4).all(), cosines
    # The imprinted centres make the loss of these very embeddings lower than random centres did.
    fresh = Criterion(LossConfig(loss=loss_name, margin=None, subcenters=subcenters), DIM, CLASSES)
    fresh.loss.W.data.copy_(W0)
    seen = labels < CLASSES - 1
    assert crit(emb[seen], labels[seen])[0] < fresh(emb[seen], labels[seen])[0]


def test_imprinting_needs_class_centres():
    from facesiam.config import config_from_dict

    with pytest.raises(ValueError, match="init_centres"):
        config_from_dict({"loss": {"loss": "multisimilarity", "init_centres": "imprint"}})
    with pytest.raises(ValueError, match="no class centres"):
        Criterion(LossConfig(loss="triplet"), DIM, CLASSES).imprint_centres(torch.randn(4, DIM), torch.arange(4))


@pytest.mark.parametrize("name", LOSSES.names())
def test_every_registered_loss_builds_a_pml_loss_of_its_family(name):
    from pytorch_metric_learning.losses import BaseMetricLossFunction

    loss = build_pml_loss(LossConfig(loss=name), DIM, CLASSES)
    assert isinstance(loss, BaseMetricLossFunction)
    assert LOSSES.get(name).info["family"] in ("pair", "margin")
    assert hasattr(loss, "W") == (LOSSES.get(name).info["family"] == "margin"), "margin losses hold class centres"


@pytest.mark.parametrize("name", MINERS.names())
def test_every_registered_miner_builds(name):
    from pytorch_metric_learning.miners import BaseMiner

    miner = build_miner(LossConfig(miner=name))
    assert (miner is None) == (name == "none") and (miner is None or isinstance(miner, BaseMiner))


def test_loss_families_come_from_the_entries():
    assert LOSSES.names(family="pair") == ("triplet", "contrastive", "multisimilarity")
    assert LOSSES.names(family="margin") == ("arcface", "subcenter_arcface", "cosface")


@pytest.mark.parametrize("loss,match", [
    ({"loss": "triplet", "pair_loss": "contrastive"}, "pair_loss .* adds a pair loss to a margin loss"),
    ({"loss": "arcface", "pair_loss": "cosface"}, "loss.pair_loss is 'cosface'; choose none or a pair loss"),
    ({"loss": "arcface", "miner": "hard"}, "miner 'hard' applies to pair losses, not 'arcface'"),
    ({"loss": "triplet", "init_centres": "imprint"}, "imprint needs class centres: a margin loss, not 'triplet'"),
    ({"loss": "hinge"}, "config key 'loss.loss': unknown loss 'hinge'; choose one of triplet, contrastive"),
])
def test_config_refuses_loss_combinations_that_do_not_fit(loss, match):
    with pytest.raises(InputError, match=match):
        config_from_dict({"loss": loss})


def test_combinations_that_fit_pass():
    config_from_dict({"loss": {"loss": "arcface", "pair_loss": "multisimilarity", "miner": "multisimilarity",
                               "init_centres": "imprint"}})
    config_from_dict({"loss": {"loss": "triplet", "miner": "semihard"}})


# ------------------------------------------------------------------------------------------ each loss's own defaults
# The expected values are PML's own constructor defaults (read from a bare PML object), except where facesiam documents
# its own choice (triplet: the seed article's 0.1; contrastive on cosine: 0.5 instead of a distance margin).
def _pml(name: str):
    from pytorch_metric_learning import losses as pml

    return {"arcface": pml.ArcFaceLoss(num_classes=3, embedding_size=4),
            "subcenter_arcface": pml.SubCenterArcFaceLoss(num_classes=3, embedding_size=4),
            "cosface": pml.CosFaceLoss(num_classes=3, embedding_size=4),
            "multisimilarity": pml.MultiSimilarityLoss(),
            "contrastive": pml.ContrastiveLoss()}[name]


@pytest.mark.parametrize("name,attrs", [
    ("arcface", ("margin", "scale")), ("subcenter_arcface", ("margin", "scale")), ("cosface", ("margin", "scale")),
    ("multisimilarity", ("base",)),
])
def test_a_loss_without_margin_or_scale_gets_its_own_defaults_not_another_losss(name, attrs):
    import math

    cfg = config_from_dict({"loss": {"loss": name}})  # what `--loss NAME` alone gives
    built = build_pml_loss(cfg.loss, 8, 4)
    for attr in attrs:
        assert getattr(built, attr) == pytest.approx(getattr(_pml(name), attr)), attr
    if name in ("arcface", "subcenter_arcface"):  # 28.6 degrees: arcface_torch's m = 0.5 rad
        assert math.radians(cfg.loss.margin) == pytest.approx(0.5, abs=1e-3)
        assert built.margin > 0.4  # PML keeps the margin in radians internally: never the 0.1 degree of before
    # The resolved values are recorded, so RUN/config.yaml says what ran.
    assert cfg.loss.margin is not None and (cfg.loss.scale is not None) == (LOSSES.get(name).info["family"] == "margin")


def test_triplet_and_contrastive_defaults_are_facesiams_documented_ones():
    from facesiam.losses import loss_defaults

    assert config_from_dict({}).loss.margin == loss_defaults(LossConfig(loss="triplet"))["margin"][0] == 0.1
    assert build_pml_loss(LossConfig(loss="triplet"), 8, 4).margin == pytest.approx(0.1)
    cosine = build_pml_loss(LossConfig(loss="contrastive"), 8, 4)
    assert (cosine.pos_margin, cosine.neg_margin) == (1.0, 0.5)
    euclidean = build_pml_loss(LossConfig(loss="contrastive", distance="euclidean"), 8, 4)
    assert euclidean.neg_margin == _pml("contrastive").neg_margin  # PML's own on a distance


def test_an_explicit_margin_wins_and_a_radian_looking_arcface_margin_warns(caplog):
    with caplog.at_level("WARNING", logger="facesiam.train"):
        cfg = config_from_dict({"loss": {"loss": "arcface", "margin": 0.5}})
    assert cfg.loss.margin == 0.5
    assert "in degrees" in caplog.text and "--margin 28.6" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="facesiam.train"):
        config_from_dict({"loss": {"loss": "arcface", "margin": 20}})
        config_from_dict({"loss": {"loss": "cosface", "margin": 0.35}})  # cosface margins are cosines: no warning
    assert "in degrees" not in caplog.text


def test_help_and_saved_config_give_each_losss_margin_unit(tmp_path, capsys):
    from facesiam.commands.train import parser
    from facesiam.config import save_yaml

    text = " ".join(parser().format_help().split())
    assert "arcface 28.6 (degrees" in text and "triplet 0.1 (cosine distance" in text and "cosface 64 (logit" in text
    save_yaml(config_from_dict({"loss": {"loss": "arcface"}}), tmp_path / "config.yaml")
    saved = (tmp_path / "config.yaml").read_text()
    assert saved.startswith("# loss.margin 28.6: degrees") and "# loss.scale 64: logit scale" in saved
    assert config_from_dict(__import__("yaml").safe_load(saved)).loss.margin == 28.6  # comments do not change it


def test_a_triplet_miner_uses_the_triplet_margin_not_a_margin_loss_degrees():
    arc = LossConfig(loss="arcface", margin=28.6, pair_loss="triplet", miner="semihard")
    assert build_miner(arc).margin == pytest.approx(0.1)
    assert build_miner(LossConfig(loss="triplet", margin=0.3, miner="hard")).margin == pytest.approx(0.3)
