"""Shared fixtures: offline, a private cache, the tiny base and a folder of photos."""
from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# `make test` runs the suite in several processes (pytest-xdist, one per core, whole files per process): each takes
# its share of the cores for torch and for the CLI subprocesses it starts (OMP_NUM_THREADS).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_THREADS = max(1, min(2, (os.cpu_count() or 1) // _WORKERS))
torch.set_num_threads(min(_THREADS, torch.get_num_threads()))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))


# `make test` runs the suite with pytest-xdist, `-n auto --dist loadfile`. The scheduler below refines loadfile: a work
# unit is a test file, or one value of a file's module-scoped fixture parameter (each base of a file parametrized
# by base), so that every module fixture is still built once, in one process, while a long file's bases run side
# by side. Units start slowest first, so that no long one is left running alone at the end. (pytest 9 keeps
# xdist's own `--dist loadgroup` from regrouping tests, hence a scheduler here.) The processes write the units of
# their collection beside their temp folders; the scheduler, in the main process, reads them.
SLOW_FIRST = (  # file names, slowest first: per-file totals of a parallel run's junit times (2026-12-06)
    "test_method_contract.py", "test_fast_path.py", "test_interop.py", "test_interop_dit.py", "test_class_phrases.py",
    "test_baselines.py",
    "test_families.py", "test_toyworld_claims.py", "test_interop_families.py", "test_base.py", "test_bad_input.py",
    "test_benchmark.py", "test_best_step.py", "test_stock_loaders.py", "test_base_defaults.py",
    "test_data_parallel.py", "test_bad_input_training.py", "test_dreambooth_families.py", "test_benchmark_cc101.py",
    "test_ui_browser.py")  # a browser, a server and a training run: started early rather than left for the end


def _work_unit(item) -> str:
    """``test_x.py``, or ``test_x.py[base=tiny-sd2]`` for one value of the module-scoped fixture ``base`` (its
    value where it is a string: an indirect parameter's index counts rows of each test's own list)."""
    callspec = getattr(item, "callspec", None)
    defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
    value = lambda name: callspec.params[name] if isinstance(callspec.params[name], str) else callspec.indices[name]  # noqa: E731
    params = [f"{name}={value(name)}" for name in sorted(callspec.params)
              if defs.get(name) and defs[name][-1].scope == "module"] if callspec is not None else []
    return item.path.name + (f"[{','.join(params)}]" if params else "")


@pytest.hookimpl(trylast=True)  # after pytest's own reordering by fixture parameter
def pytest_collection_modifyitems(config, items):
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not worker or not getattr(config.option, "basetemp", None):
        return
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
    units = {item.nodeid: _work_unit(item) for item in items}
    (Path(config.option.basetemp).parent / f"work-units-{worker}.json").write_text(json.dumps(units))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling

    root = config._tmp_path_factory.getbasetemp()

    class ByWorkUnit(LoadScopeScheduling):
        units: dict = {}

        def _split_scope(self, nodeid: str) -> str:
            if not self.units:
                for path in sorted(root.glob("work-units-*.json")):
                    self.units.update(json.loads(path.read_text()))
            return self.units.get(nodeid) or nodeid.split("::", 1)[0]

    config.option.loadscopereorder = False  # keep the collection's order: slowest first
    return ByWorkUnit(config, log)


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Caches (covariance, ...) go to a temp folder shared by the whole test session. Under pytest-xdist each
    process has its own cache, but the covariances (the same file for the same base, written atomically) are in
    one folder of the run that every process reads and fills: a base's C is computed by the first process that
    needs it and read by the others (unless both need it at the same moment)."""
    path = tmp_path_factory.mktemp("cache")
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = tmp_path_factory.getbasetemp().parent / "shared-covariance"
        shared.mkdir(exist_ok=True)
        (path / "covariance").symlink_to(shared, target_is_directory=True)
    old = os.environ.get("PERSONALIZE_CACHE")
    os.environ["PERSONALIZE_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("PERSONALIZE_CACHE", None)
    else:
        os.environ["PERSONALIZE_CACHE"] = old


@pytest.fixture(scope="session")
def _tiny_master():
    from personalize.base import load_base

    return load_base("tiny")


@pytest.fixture
def tiny(_tiny_master):
    """A fresh copy of the tiny base (tests may attach things to it)."""
    return copy.deepcopy(_tiny_master)


def make_photos(folder, n: int = 4, size: int = 40):
    """A few synthetic photos of 'a green disc' on varied backgrounds."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = Image.new("RGB", (size + 8 * i, size), (200, 40 * i, 60))
        draw = ImageDraw.Draw(img)
        draw.ellipse((6 + 2 * i, 6, 30 + 2 * i, 30), fill=(30, 200, 40), outline=(0, 0, 0))
        img.save(folder / f"photo_{i}.png")
    return folder


def make_segmenter(folder, seed: int = 0):
    """A tiny random CLIPSeg (transformers config + the offline CLIP tokenizer), saved like a hub download: what
    ``--segmenter DIR`` reads. Random weights give arbitrary but deterministic soft masks."""
    from transformers import CLIPImageProcessor, CLIPSegConfig, CLIPSegForImageSegmentation, CLIPSegProcessor

    from personalize.tokenizer import build_clip_tokenizer

    torch.manual_seed(seed)
    small = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 2}
    config = CLIPSegConfig(
        text_config={**small, "num_hidden_layers": 2, "vocab_size": 49408, "max_position_embeddings": 77},
        vision_config={**small, "num_hidden_layers": 3, "image_size": 64, "patch_size": 16},
        projection_dim=16, reduce_dim=16, extract_layers=[0, 1, 2], decoder_num_attention_heads=2,
        decoder_intermediate_size=37)
    images = CLIPImageProcessor(size={"height": 64, "width": 64}, do_center_crop=False,
                                image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    CLIPSegForImageSegmentation(config).save_pretrained(folder)
    CLIPSegProcessor(image_processor=images, tokenizer=build_clip_tokenizer()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_segmenter(tmp_path_factory):
    """The folder of a tiny random CLIPSeg (``--segmenter DIR``)."""
    return make_segmenter(tmp_path_factory.mktemp("clipseg"))


@pytest.fixture
def photos(tmp_path):
    return make_photos(tmp_path / "photos")


FAST = {"steps": 2, "batch_size": 2, "checkpoint_every": 0, "masks": "none"}


@pytest.fixture(scope="session")
def trained_concept(tmp_path_factory, _tiny_master):
    """A Perfusion concept trained for a few steps on the tiny base (file path)."""
    from personalize import train

    root = tmp_path_factory.mktemp("concept")
    folder = make_photos(root / "photos")
    pipe = copy.deepcopy(_tiny_master)
    return train(pipe, folder, token="<disc>", superclass="ball", out=root / "disc.safetensors",
                 settings={"steps": 4, "batch_size": 2, "checkpoint_every": 0}, masks="none", progress=False)


@pytest.fixture(scope="session")
def trained_residuals(tmp_path_factory, _tiny_master):
    """A Personalized Residuals concept trained for a few steps on the tiny base (file path)."""
    from personalize import train

    root = tmp_path_factory.mktemp("residuals")
    folder = make_photos(root / "photos")
    pipe = copy.deepcopy(_tiny_master)
    return train(pipe, folder, token="<disc>", superclass="ball", out=root / "disc.safetensors", method="residuals",
                 settings={"steps": 3, "batch_size": 2, "checkpoint_every": 0}, progress=False)


def _save_random_weights(encoder, path):
    """A random-init encoder's state dict as fp16 safetensors (what --clip-weights / --dino-weights read)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().half().contiguous() for k, v in encoder.model.state_dict().items()}, str(path))
    return path


def _random_weights_file(encoder_name: str, tmp_path_factory, filename: str):
    import personalize.evaluation as evaluation

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        encoder = getattr(evaluation, encoder_name)(random_weights=True)
    return _save_random_weights(encoder, tmp_path_factory.mktemp("weights") / filename)


@pytest.fixture(scope="session")
def clip_weights_file(tmp_path_factory):
    """A local CLIP ViT-B-32-quickgelu weights file (random init, seed 0): the offline stand-in for the 'openai' weights."""
    return _random_weights_file("ClipEncoder", tmp_path_factory, "clip.safetensors")


@pytest.fixture(scope="session")
def dino_weights_file(tmp_path_factory):
    """A local DINO ViT-S/16 weights file (random init, seed 0)."""
    return _random_weights_file("DinoEncoder", tmp_path_factory, "dino.safetensors")


def _cc101_concept(token, cls, d, prompt_file):
    return {"instance_prompt": f"photo of a {token} {cls}", "class_prompt": cls,
            "instance_data_dir": f"./benchmark_dataset/{d}", "class_data_dir": f"./regularization/{d}",
            "prompt_filename": prompt_file}


def write_cc101_json(root, singles, pairs) -> None:
    """``dataset.json`` (one entry per ``(token, class, folder, prompt file)``) and ``dataset_multiconcept.json``
    (one ``[a, b, {"prompt_filename_compose": file}]`` per ``(a, b, file)``) in CustomConcept101's layout."""
    import json

    json.dump([_cc101_concept(*c) for c in singles], open(root / "dataset.json", "w"))
    json.dump([[_cc101_concept(*a), _cc101_concept(*b), {"prompt_filename_compose": f}] for a, b, f in pairs],
              open(root / "dataset_multiconcept.json", "w"))


@pytest.fixture()
def cc101(tmp_path):
    """A small CustomConcept101 folder in the real layout (3 concept folders, prompts, both json files)."""
    import numpy as np
    from PIL import Image

    root = tmp_path / "cc101"
    (root / "prompts").mkdir(parents=True)
    for d, n in (("scene_barn", 3), ("pet_cat1", 2), ("furniture_chair1", 2)):
        folder = root / "benchmark_dataset" / d
        folder.mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(folder / f"{i}.{'jpg' if i % 2 else 'png'}")
        (folder / "notes.txt").write_text("not an image")
    # trailing spaces, CRLF, blank line, no final newline
    (root / "prompts" / "barn.txt").write_text("{} in snowy ice.  \r\nphoto of a {} at night\n\n{} with a river")
    (root / "prompts" / "cat.txt").write_text("a {} sleeping \n")
    (root / "prompts" / "chair.txt").write_text("a {} in a room\n")
    (root / "prompts" / "pet_furniture.txt").write_text("{0} sitting on {1}   \n{1} next to {0}")
    cat = ("<new1>", "cat", "pet_cat1", "prompts/cat.txt")
    write_cc101_json(root, [("<new1>", "barn", "scene_barn", "prompts/barn.txt"), cat],
                     [(cat, ("<new2>", "chair", "furniture_chair1", "prompts/chair.txt"), "prompts/pet_furniture.txt")])
    return root


def assert_eq4_group(pipe, concepts, layers, width: int | None = None) -> None:
    """Perfusion's Eq. 4 with the attached ``concepts``: one shared group, its members in token order, a basis
    with one column per concept (``width`` rows when given), and every layer mapping each i* to that concept's
    o*_V."""
    from personalize.edits.sites import site_occupant
    from personalize.methods.perfusion import PerfusionGroup, _key

    group = site_occupant(pipe.unet, f"{layers[0]}.to_v", PerfusionGroup.KEY).group
    assert [c.token for c in group.members] == sorted(c.token for c in concepts)
    basis = group.projection(torch.float32, "cpu").basis
    assert basis.shape[1] == len(concepts) and (width is None or basis.shape[0] == width)
    for concept in concepts:
        i_star = concept.tensors["i_star"].view(1, 1, -1)
        for layer in layers:
            out = pipe.unet.get_submodule(f"{layer}.to_v")(i_star)[0, 0]
            o_star = concept.tensors[f"o_v.{_key(layer)}"]
            torch.testing.assert_close(out, o_star, rtol=1e-3, atol=1e-3 * o_star.abs().max().item())


@pytest.fixture
def residuals_copy(tmp_path, trained_residuals) -> Path:
    """A copy of the session's residuals concept that a test may overwrite or export."""
    path = tmp_path / "concepts" / "res.safetensors"
    path.parent.mkdir(exist_ok=True)
    shutil.copyfile(trained_residuals, path)
    return path


@pytest.fixture
def keep_compile_settings(monkeypatch):
    """Compiling points torch's caches at the package cache (``use_compile_cache``): undone after each test
    (torch's ``config.patch``: monkeypatch's undo would delete the options, which torch then hides)."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    for name in ("TORCHINDUCTOR_CACHE_DIR", "TORCHINDUCTOR_FX_GRAPH_CACHE", "TORCHINDUCTOR_AUTOGRAD_CACHE"):
        monkeypatch.delenv(name, raising=False)
    with inductor_config.patch(fx_graph_cache=inductor_config.fx_graph_cache), \
            functorch_config.patch(enable_autograd_cache=functorch_config.enable_autograd_cache):
        yield
