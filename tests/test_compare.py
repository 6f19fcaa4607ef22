"""``retrieval compare``: variants × seeds on shared features, results.json, and a report drawn from it alone."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from pipelines.compare import main as compare
from retrieval.compare import load_compare_config
from retrieval.compare_results import ComparisonResults, RunResult
from retrieval.errors import ConfigError, DataError
from retrieval.report import render_report
from retrieval.rundir import RunDir
from tests.conftest import PROJECT_ROOT

VARIANTS = [
    {"name": "triplet-farthest", "set": ["loss.name=triplet", "loss.negatives=farthest"]},
    # loss={...} replaces the base's triplet section (margin, negatives) with one of its own
    {"name": "sigmoid-ce", "set": ["loss={name: sigmoid-ce}", "model.normalize_output=false"]},
    {"name": "softmax-ce", "set": ["loss={name: softmax-ce}"]},  # no class labels here: skipped with a note
    {"name": "conse", "kind": "conse"},  # no training
]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# A number standing alone: not part of a word ("word2vec", "glove-6b-50d") or a metric name ("R@5").
NUMBER = re.compile(r"(?<![\w@.])[+-]?\d+(?:\.\d+)?(?![\w.])")


def write_config(folder: Path, shards: Path, **extra) -> Path:
    config = {"name": "tiny", "base": str(PROJECT_ROOT / "configs" / "demo.yaml"), "data": {"shard_dir": str(shards)},
              "train": {"epochs": 2, "eval_every": 1}, "seeds": [0, 1], "out": str(folder / "out"),
              "curve_max_k": 10, "example_queries": ["a pizza on a table", "a dog", "a red bus"],
              "variants": VARIANTS, **extra}
    path = folder / "compare.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def comparison(sample_shards, tmp_path_factory):
    folder = tmp_path_factory.mktemp("compare")
    threads = torch.get_num_threads()
    assert compare(["--config", str(write_config(folder, sample_shards)), "--no-progress", "--threads", "1"]) == 0
    assert torch.get_num_threads() == threads  # the job restores the process-wide setting
    out = folder / "out"
    return out, json.loads((out / "results.json").read_text()), (out / "report.md").read_text()


@pytest.mark.slow
def test_every_variant_and_seed_ran_on_one_feature_cache(comparison):
    out, results, _ = comparison
    status = {v["name"]: v["status"] for v in results["variants"]}
    assert status["triplet-farthest"] == status["sigmoid-ce"] == "ok" and status["softmax-ce"] == "skipped"
    assert "class labels" in next(v["note"] for v in results["variants"] if v["name"] == "softmax-ce")
    cached = sorted(p.name for p in (out / "feature_cache").iterdir())  # one file per split, for every run
    assert len(cached) == 2 and cached[0].startswith("train-") and cached[1].startswith("val-")
    for variant in (v for v in results["variants"] if v["kind"] == "train" and v["status"] == "ok"):
        assert [run["seed"] for run in variant["runs"]] == [0, 1]
        for run in variant["runs"]:
            assert run["wall_seconds"] > 0 and len(run["history"]) == 3  # epoch 0 (untrained) + 2 epochs
            assert run["distance"] in ("l2", "cosine") and (variant["loss"] != "triplet" or run["distance"] == "l2")
            stored = torch.load(RunDir(out / run["run_dir"]).checkpoint("last.pt"), weights_only=False)["metrics"]
            assert {k: run["metrics"][k] for k in stored} == pytest.approx(stored, abs=1e-6)
        assert len(variant["summary"]["recall_curve"]["text_to_image"]) == 10
    families = {v["name"]: v["family"] for v in results["variants"]}  # what each loss declares
    assert families == {"triplet-farthest": "triplet", "sigmoid-ce": "cross-entropy", "softmax-ce": "cross-entropy",
                        "conse": "reference"}
    recipe = next(v["recipe"]["loss"] for v in results["variants"] if v["name"] == "triplet-farthest")
    assert recipe == {"name": "triplet", "margin": 0.4, "squared": False, "negatives": "farthest",
                      "far_quantile": None, "far_distance": None, "anchors": "image",
                      "hinge": "sampled"}  # every setting
    assert results["command"].startswith("retrieval compare --config")
    assert results["base_config"]["train"]["epochs"] == 2 and results["num_seeds"] == 2


@pytest.mark.slow
def test_report_has_its_sections_rows_and_plots(comparison):
    out, results, report = comparison
    for heading in ("## Verdict", "## Triplet or cross-entropy, in each direction", "### text→image",
                    "### image→text", "## How to read the numbers", "## Held-out retrieval: text→image",
                    "## Held-out retrieval: image→text", "## Training cost", "## Training signals",
                    "### Collapse alarm", "## Skipped variants", "## Plots"):
        assert heading in report
    assert "*at least one* relevant item among the top K" in report and "pessimistically" in report
    for variant in results["variants"]:
        rows = [line for line in report.splitlines() if line.startswith(f"| `{variant['name']}` |")]
        # two metric tables and the cost table; a trained variant also has a training-signals row
        expected = 0 if variant["status"] != "ok" else 4 if variant["kind"] == "train" else 3
        assert len(rows) == expected, variant["name"]
    assert report.count("| chance |") == 2
    winner = results["verdict"]["winner"]["name"]
    assert f"**`{winner}` wins**" in report and "2 seeds" in report
    for name in ("training_curves.png", "training_signals.png", "recall_at_k.png", "examples.png"):
        path = out / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE and f"({name})" in report
        with Image.open(path) as image:
            image.verify()
            assert min(image.size) > 200


def strings(value) -> set[str]:
    if isinstance(value, dict):
        return set().union(*(strings(v) | {str(k)} for k, v in value.items())) if value else set()
    if isinstance(value, list):
        return set().union(*(strings(v) for v in value)) if value else set()
    return {value} if isinstance(value, str) else set()


def formatted_numbers(value) -> set[str]:
    """Every number of the results printed the ways the report prints numbers."""
    if isinstance(value, dict):
        return set().union(set(), *(formatted_numbers(v) for v in value.values()))
    if isinstance(value, list):
        return set().union(set(), *(formatted_numbers(v) for v in value))
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return set()
    if isinstance(value, int):
        return {str(value)}
    return {f"{value:.3f}", f"{value:+.3f}", f"{value:.1f}", f"{value:+.1f}"}


def check_numbers_come_from(results: dict, report: str) -> int:
    """Assert each number of ``report`` is a results value; code spans must be result strings verbatim."""
    texts = strings(results)
    for span in re.findall(r"`([^`]+)`", report):
        assert span in texts, span
    prose = re.sub(r"`[^`]+`", "", re.sub(r"!\[[^\]]*\]\([^)]*\)", "", report))
    numbers = NUMBER.findall(prose)
    allowed = formatted_numbers(results)
    missing = [n for n in numbers if n not in allowed]
    assert not missing, missing
    return len(numbers)


@pytest.mark.slow
def test_every_number_in_the_report_comes_from_results_json(comparison):
    _, results, report = comparison
    typed = ComparisonResults.from_json(results)
    assert typed.to_json() == results  # results.json reads back as it was written
    assert report == render_report(typed)  # the report is a function of results.json alone
    assert check_numbers_come_from(results, report) > 50


@pytest.mark.slow
def test_a_second_run_reuses_finished_runs(comparison, sample_shards):
    out, results, _ = comparison
    config = write_config(out.parent, sample_shards)
    assert compare(["--config", str(config), "--no-progress"]) == 0
    again = json.loads((out / "results.json").read_text())
    runs = [[r["wall_seconds"] for r in v["runs"]] for v in results["variants"] if v["kind"] == "train"]
    assert runs == [[r["wall_seconds"] for r in v["runs"]] for v in again["variants"] if v["kind"] == "train"]


def hand_made_results() -> dict:
    def variant(name, loss, mean, std, vectors="glove-6b-50d", family="triplet", zero=None):
        stats = {f"{d}/{m}": {"mean": mean, "std": std} for d in ("text_to_image", "image_to_text")
                 for m in ("R@1", "R@5", "R@10", "P@1", "P@5", "P@10", "mAP", "MedR")}
        run = {"seed": 0, "run_dir": f"runs/{name}/seed-0", "wall_seconds": 12.5, "train_seconds": 10.25,
               "history": [], "distance": "l2", "metrics": {}, "chance": {}, "zero_shot": None, "relevance": "class",
               "num_captions": 200, "recall_curve": {}, "examples": {}, "example_matches": {}}
        return {"name": name, "kind": "train", "set": [f"loss.name={loss}"], "optional": False, "family": family,
                "loss": loss, "negatives": "farthest", "text_vectors": vectors, "recipe": {}, "status": "ok",
                "note": None,
                "runs": [run],
                "summary": {"num_runs": 3, "metrics": stats, "zero_shot": zero,
                            "wall_seconds": {"mean": 12.5, "std": 0.5}, "train_seconds": {"mean": 10.25, "std": 0.25},
                            "recall_curve": {"text_to_image": [0.1, 0.3], "image_to_text": [0.2, 0.4]}}}

    zero = {f"text_to_image/{m}": {"mean": 0.25, "std": 0.05} for m in ("R@1", "R@5", "R@10", "mAP", "MedR")}
    triplet = {"name": "triplet-farthest", "mean": 0.45, "std": 0.02, "runs": 3}
    sigmoid = {"name": "sigmoid-ce", "mean": 0.33, "std": 0.03, "runs": 3, "margin": 0.12}
    return {
        "format": "retrieval-compare/2", "name": "hand", "command": "retrieval compare --config hand.yaml",
        "compare_config": {}, "base_config": {}, "seeds": [0, 1, 2], "num_seeds": 3,
        "checkpoint": "last.pt", "primary_metric": "text_to_image/R@5", "ks": [1, 5, 10],
        "example_queries": [], "example_top_k": 4,
        "data": {"shard_dir": "shards", "val_shards": [], "num_val_images": 40, "num_val_captions": 200,
                 "relevance": "class"},
        "chance": {"text_to_image/R@5": 0.125}, "zero_shot_chance": {"text_to_image/R@5": 0.0625},
        "zero_shot_queries": [{"label": 5, "name": "sandal", "known": True}],
        "variants": [variant("triplet-farthest", "triplet", 0.45, 0.02, zero=zero),
                     variant("sigmoid-ce", "sigmoid-ce", 0.33, 0.03, family="cross-entropy"),
                     {"name": "softmax-ce", "kind": "train", "set": [], "optional": False, "family": "cross-entropy",
                      "loss": "softmax-ce", "negatives": "farthest", "text_vectors": "glove-6b-50d", "recipe": {},
                      "status": "skipped", "note": "needs class labels", "runs": []}],
        "verdict": {"metric": "text_to_image/R@5", "ranking": ["triplet-farthest", "sigmoid-ce"], "winner": triplet,
                    "runner_up": sigmoid, "best_cross_entropy": sigmoid,
                    "triplet_vs_cross_entropy": {"triplet": triplet, "cross_entropy": sigmoid,
                                                 "vectors": "glove-6b-50d"}},
        "text_sides": [], "setup_seconds": {"features": 3.5, "text": {"glove-6b-50d": 1.5}},
    }


def test_render_report_states_the_winner_and_its_margins():
    results = hand_made_results()
    typed = ComparisonResults.from_json(results)
    assert typed.to_json() == results
    report = render_report(typed)
    assert ("**`triplet-farthest` wins**: it beats `sigmoid-ce` by +0.120 text→image R@5 (0.450 ± 0.020 vs "
            "0.330 ± 0.030, 3 seeds).") in report
    assert "Over the best cross-entropy variant `sigmoid-ce`: +0.120" in report
    assert "Triplet vs cross-entropy on `glove-6b-50d` targets: best triplet `triplet-farthest`" in report
    assert "**triplet** retrieves better" in report and "Chance level of text→image R@5: 0.125." in report
    assert "## Zero-shot retrieval" in report and "`sandal`" in report and "0.250 ± 0.050" in report
    assert "- `softmax-ce`: `needs class labels`" in report
    assert ("| `triplet-farthest` | train | `triplet` (`farthest` negatives) | `glove-6b-50d` | 12.5 ± 0.5 "
            "| 10.2 ± 0.2 |" in report)
    assert "into the shared cache, 3.5 s; a first load of each text side, so that no run pays a cold start: " \
           "`glove-6b-50d` 1.5 s." in report
    check_numbers_come_from(results, report)


def test_the_published_report_reads_back_and_renders_the_same():
    """reports/fashion_mnist: results.json reads back field for field, and report.md is rendered from it."""
    folder = PROJECT_ROOT / "reports" / "fashion_mnist"
    written = json.loads((folder / "results.json").read_text())
    results = ComparisonResults.from_json(written)
    assert results.to_json() == written
    assert render_report(results) == (folder / "report.md").read_text()
    assert {run.distance for variant in results.variants for run in variant.runs} == {"l2", "cosine"}


def test_results_that_do_not_fit_are_one_line_errors():
    results = hand_made_results()
    cases = [({**results, "format": "retrieval-compare/1"}, "retrieval-compare/1"),
             ({**results, "bogus": 1}, "bogus"),
             ({k: v for k, v in results.items() if k != "verdict"}, "verdict"),
             ({**results, "num_seeds": "three"}, "num_seeds")]
    bad_run = json.loads(json.dumps(results))
    bad_run["variants"][0]["runs"][0]["wall_seconds"] = "slow"
    cases.append((bad_run, "variants[0].runs[0]"))
    for data, needle in cases:
        with pytest.raises(DataError) as error:
            ComparisonResults.from_json(data, "results.json")
        assert needle in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(DataError, match="search_metric"):  # a run record of the first format is not read as today's
        RunResult.from_json({**results["variants"][0]["runs"][0], "search_metric": "l2"})


def test_compare_config_errors_are_one_line(tmp_path, sample_shards):
    cases = [({"bogus": 1}, "bogus"), ({"variants": []}, "variants"),
             ({"variants": [{"name": "a"}, {"name": "a"}]}, "unique"),
             ({"variants": [{"name": "a", "sets": []}]}, "sets"),
             ({"primary_metric": "text_to_image/R@7"}, "R@7"),
             ({"variants": [{"name": "a", "set": ["loss.nope=1"]}]}, "nope"),
             ({"variants": [{"set": ["loss.name=triplet"]}]}, "name"),
             ({"variants": [{"name": "a", "kind": "finetune"}]}, "finetune"),
             ({"variants": [{"name": "a", "top_t": "ten"}]}, "top_t"),
             ({"variants": "a"}, "variants"),
             ({"variants": [{"name": "a", "set": ["loss.name=sigmoid-ce"]}]}, "'loss={name: sigmoid-ce, ...}'"),
             ({"seeds": []}, "seeds"), ({"seeds": [0, 0]}, "seeds"), ({"seeds": [1.5]}, "seeds[0]"),
             ({"curve_max_k": 0}, "curve_max_k"), ({"example_queries": "a dog"}, "example_queries"),
             ({"data": ["shard_dir"]}, "data"), ({"train": {"epochs": "two"}}, "epochs")]
    for extra, needle in cases:
        with pytest.raises(ConfigError) as error:
            load_compare_config(write_config(tmp_path, sample_shards, **extra))
        assert needle in str(error.value) and "\n" not in str(error.value)


def test_each_direction_sets_the_best_triplet_against_the_best_cross_entropy_on_every_metric():
    from retrieval.compare import direction_verdicts

    results = hand_made_results()
    triplet, sigmoid = results["variants"][0], results["variants"][1]
    # image→text: cross-entropy ahead on mAP by more than the two spreads, R@1 a tie within them
    sigmoid["summary"]["metrics"]["image_to_text/mAP"] = {"mean": 0.6, "std": 0.05}
    triplet["summary"]["metrics"]["image_to_text/R@1"] = {"mean": 0.34, "std": 0.02}
    typed = ComparisonResults.from_json(results)
    found = direction_verdicts(typed.variants, "glove-6b-50d", [1, 5, 10])
    assert [d.direction for d in found] == ["text_to_image", "image_to_text"]
    t2i, i2t = found
    assert (t2i.best.name, t2i.triplet, t2i.cross_entropy) == ("triplet-farthest", "triplet-farthest", "sigmoid-ce")
    assert [p.metric for p in t2i.metrics] == ["R@1", "R@5", "R@10", "mAP"]
    assert all(p.margin == pytest.approx(0.12) and p.clear for p in t2i.metrics)  # 0.12 > 0.02 + 0.03
    by_metric = {p.metric: p for p in i2t.metrics}
    assert i2t.best.name == "sigmoid-ce" and by_metric["mAP"].margin == pytest.approx(0.45 - 0.6)
    assert by_metric["mAP"].clear and not by_metric["R@1"].clear  # |0.01| < 0.02 + 0.03
    results["directions"] = [d.to_json() for d in found]
    report = render_report(ComparisonResults.from_json(results))
    assert "| mAP | 0.450 ± 0.020 | 0.600 ± 0.050 | -0.150 | **cross-entropy**, beyond the seeds' spread |" in report
    assert "| R@1 | 0.340 ± 0.020 | 0.330 ± 0.030 | +0.010 | triplet, within the seeds' spread |" in report
    assert "Class captions tie" in report  # relevance by class
    check_numbers_come_from(results, report)
