"""Config loading, overrides and validation: every user mistake gives one paragraph naming the field."""

from __future__ import annotations

import subprocess
import sys

import pytest

from perceptio_dist.config import ConfigError, iter_field_docs, recipe_names
from perceptio_dist.config.training import PerceptioConfig, load_config, validate_runtime

from .conftest import NO_TOKENIZER, ROOT


def test_shipped_recipes_load():
    assert {"tiny_cpu", "perceptio_8b"} <= set(recipe_names())
    tiny = load_config("tiny_cpu")
    assert isinstance(tiny, PerceptioConfig)
    assert tiny.parallel.zero_stage == 3 and tiny.model.tokens.num_depth_tokens == 16
    big = load_config("perceptio_8b")
    assert big.model.tokens.num_depth_codes == 128 and big.model.tokens.num_depth_tokens == 100
    assert big.model.backbone.text.hidden_size == 4096


def test_dotted_overrides_are_typed():
    cfg = load_config("tiny_cpu", ["train.lr=1e-4", "train.max_steps=7", "train.activation_checkpointing=true",
                                   "model.backbone.pretrained_path=null", "train.betas=[0.8, 0.9]"])
    assert cfg.train.lr == pytest.approx(1e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.max_steps == 7
    assert cfg.train.activation_checkpointing is True
    assert cfg.train.betas == [0.8, 0.9]


def test_yaml_file_recipe(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("train:\n  max_steps: 3\n  warmup_steps: 1\nmodel:\n  backbone:\n    tokenizer: builtin:tiny_bpe\n")
    cfg = load_config(str(path))
    assert cfg.train.max_steps == 3


@pytest.mark.parametrize(
    "override, words",
    [
        ("train.lrr=1", ["unknown key 'train.lrr'", "Did you mean 'train.lr'"]),
        ("model.backbone.visoin.hidden_size=3", ["unknown key 'model.backbone.visoin'", "vision"]),
        ("train.max_steps=abc", ["'train.max_steps'", "expected an integer", "'abc'"]),
        ("train.activation_checkpointing=3", ["'train.activation_checkpointing'", "true or false"]),
        ("parallel.zero_stage=4", ["'parallel.zero_stage'", "one of 0, 1, 2, 3"]),
        ("train.precision=fp16", ["'train.precision'", "'bf16'"]),
        ("model.depth_vqvae.input_size=30", ["'model.depth_vqvae.input_size'", "power of two"]),
        ("train.warmup_steps=100", ["'train.warmup_steps'"]),
        ("train.global_batch_size=5", ["'train.global_batch_size'", "multiple"]),
        ("model.backbone.tokenizer=pretrained", ["'model.backbone.tokenizer'", "pretrained_path"]),
        ("objective.mask_weight=-1", ["'objective.mask_weight'", ">= 0"]),
        ("data.task_weights={vqa: 1, ocr: 1}", ["'data.task_weights'", "'ocr'"]),
        ("data.task_weights={vqa: 0}", ["'data.task_weights'", "at least one positive"]),
        ("data.depth_context_noise=1.5", ["'data.depth_context_noise'", "[0, 1]"]),
        ("data.depth_context_noise_tasks=[depht]", ["'data.depth_context_noise_tasks'", "depht"]),
        ("data.curriculum=[{until_step: 10, task_weights: {ocr: 1}}]", ["'data.curriculum[0].task_weights'", "'ocr'"]),
        ("data.curriculum=[{until_step: 10, task_weights: {}}]", ["'data.curriculum[0].task_weights'", "positive"]),
        ("data.curriculum=[{until_step: 40, task_weights: {vqa: 1}}]", ["'data.curriculum[0].until_step'",
                                                                        "train.max_steps=40"]),
        ("data.curriculum=[{until_step: 20, task_weights: {vqa: 1}}, {until_step: 10, task_weights: {vqa: 1}}]",
         ["'data.curriculum[1].until_step'", "previous phase's end (20)"]),
        ("data.curriculum=[{task_weights: {vqa: 1}}]", ["'data.curriculum[0].until_step'", "missing"]),
        ("trainlr", ["section.key=value"]),
    ],
)
def test_bad_config_names_the_field(override, words):
    with pytest.raises(ConfigError) as info:
        load_config("tiny_cpu", [override])
    message = str(info.value)
    for word in words:
        assert word in message, (word, message)
    assert "\n" not in message  # one paragraph


def test_global_batch_must_match_ranks(tmp_path):
    cfg = load_config("tiny_cpu", ["train.global_batch_size=8", f"data.shards={tmp_path}", NO_TOKENIZER])  # micro 2 x accum 1
    validate_runtime(cfg, world_size=4)
    with pytest.raises(ConfigError, match="train.global_batch_size.*2 x 1 x 2 = 4"):
        validate_runtime(cfg, world_size=2)


def test_missing_data_and_checkpoint_paths(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="'data.shards'.*perceptio-preprocess"):
        validate_runtime(load_config("tiny_cpu", ["data.shards=null"]), 1)
    with pytest.raises(ConfigError, match="'data.shards'.*does not exist"):
        validate_runtime(load_config("tiny_cpu", [f"data.shards={tmp_path / 'none'}"]), 1)
    cfg = load_config("tiny_cpu", [f"model.seg_head.sam2_checkpoint={tmp_path / 'nope.pt'}", f"data.shards={tmp_path}",
                                   NO_TOKENIZER])
    with pytest.raises(ConfigError, match="'model.seg_head.sam2_checkpoint'.*does not exist"):
        validate_runtime(cfg, 1)
    monkeypatch.setenv("PERCEPTIO_DATA", str(tmp_path))
    (tmp_path / "shards" / "perceptio_v1").mkdir(parents=True)
    monkeypatch.delenv("PERCEPTIO_WEIGHTS", raising=False)
    with pytest.raises(ConfigError, match=r"'model.backbone.pretrained_path'.*\$PERCEPTIO_WEIGHTS.*not set"):
        validate_runtime(load_config("perceptio_8b"), 1)
    monkeypatch.setenv("PERCEPTIO_WEIGHTS", str(tmp_path))
    with pytest.raises(ConfigError, match="'model.backbone.pretrained_path'.*InternVL2_5-8B-hf' does not exist"):
        validate_runtime(load_config("perceptio_8b"), 1)


def test_every_field_is_documented():
    docs = list(iter_field_docs(PerceptioConfig))
    assert len(docs) > 60
    undocumented = [name for name, _, _, doc in docs if len(doc) < 10]
    assert not undocumented


@pytest.mark.parametrize(
    "args, field",
    [
        (["train.lrr=1"], "train.lrr"),
        (["model.backbone.pretrained_path=/nonexistent/internvl", "model.backbone.tokenizer=pretrained"],
         "model.backbone.pretrained_path"),
        (["data.shards=/nonexistent/shards"], "data.shards"),
        (["model.depth_vqvae.checkpoint=/nonexistent/tokenizer.safetensors"], "model.depth_vqvae.checkpoint"),
    ],
)
def test_cli_reports_config_errors_without_traceback(args, field, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "perceptio_dist.train", "--recipe", "tiny_cpu",
         f"logging.output_dir={tmp_path}", f"data.shards={tmp_path}", NO_TOKENIZER, *args],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert field in proc.stderr
    assert proc.stderr.strip().count("\n") == 0  # one paragraph


def test_config_cli_explain_and_dump():
    out = subprocess.run([sys.executable, "-c", "from perceptio_dist.cli.config import config_main; config_main()",
                          "--explain"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "train.lr (a number" in out.stdout
    out = subprocess.run([sys.executable, "-c", "from perceptio_dist.cli.config import config_main; config_main()",
                          "--recipe", "tiny_cpu", "train.max_steps=33"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "max_steps: 33" in out.stdout


def test_configuration_reference_page_is_current():
    proc = subprocess.run([sys.executable, str(ROOT / "tools/gen_config_reference.py"), "--check"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci/run").read_text().strip().splitlines()[-1]
    assert ci == "./run_tests.sh" and f"\n{ci}" in (ROOT / "README.md").read_text()


def test_paths_are_resolved_once_at_load(tmp_path, monkeypatch):
    """$VARS and ~ are expanded and relative inputs found (working directory, then repository root) when the config
    is loaded; keywords stay; a path whose variable is unset stays as written and is refused at start by name."""
    monkeypatch.setenv("PERCEPTIO_TEST_ROOT", str(tmp_path))
    (tmp_path / "shards").mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = load_config("tiny_cpu", ["data.shards=${PERCEPTIO_TEST_ROOT}/shards", "parallel.deepspeed_config=ds_configs/zero2.json",
                                   "logging.output_dir=${PERCEPTIO_TEST_ROOT}/run", "checkpoint.resume=auto",
                                   "model.backbone.tokenizer=builtin:tiny_bpe", NO_TOKENIZER])
    assert cfg.data.shards == str(tmp_path / "shards")
    assert cfg.parallel.deepspeed_config == str(ROOT / "ds_configs/zero2.json")  # not in the working directory
    assert cfg.logging.output_dir == str(tmp_path / "run")
    assert cfg.checkpoint.resume == "auto" and cfg.model.backbone.tokenizer == "builtin:tiny_bpe"
    validate_runtime(cfg, 1)
    monkeypatch.delenv("PERCEPTIO_TEST_ROOT")
    cfg = load_config("tiny_cpu", ["data.shards=${PERCEPTIO_TEST_ROOT}/shards", NO_TOKENIZER])
    assert cfg.data.shards == "${PERCEPTIO_TEST_ROOT}/shards"
    with pytest.raises(ConfigError, match=r"'data.shards'.*\$PERCEPTIO_TEST_ROOT, which is not set"):
        validate_runtime(cfg, 1)


def test_missing_path_messages_say_what_the_path_is_for(tmp_path):
    cases = {"data.shards": "preprocessed training shards", "model.backbone.pretrained_path": "InternVL backbone",
             "model.backbone.tokenizer": "tokenizer folder", "model.depth_vqvae.checkpoint": "depth tokenizer"}
    for field_name, words in cases.items():
        overrides = [f"data.shards={tmp_path}", NO_TOKENIZER, f"{field_name}={tmp_path / 'missing'}"]
        with pytest.raises(ConfigError, match=f"'{field_name}'.*does not exist.*{words}"):
            validate_runtime(load_config("tiny_cpu", overrides), 1)
    with pytest.raises(ConfigError, match="'data.shards'.*perceptio-preprocess"):
        validate_runtime(load_config("tiny_cpu", [f"data.shards={tmp_path / 'missing'}", NO_TOKENIZER]), 1)


def test_depth_downsampling_rule_is_shared():
    """One rule for the training, preprocessing and tokenizer-training configs."""
    from perceptio_dist.preprocess.config import load_preprocess_config
    from perceptio_dist.train.vqvae_config import load_vqvae_config

    for load, field_name in ((load_config, "model.depth_vqvae.input_size"), (load_preprocess_config, "depth_vqvae.input_size"),
                             (load_vqvae_config, "depth_vqvae.input_size")):
        recipe = {load_config: "tiny_cpu", load_preprocess_config: "preprocess_tiny", load_vqvae_config: "vqvae_tiny"}[load]
        with pytest.raises(ConfigError, match=f"'{field_name}'.*power of two"):
            load(recipe, [f"{field_name}=96"])
        decoder = field_name.replace("input_size", "decoder")
        with pytest.raises(ConfigError, match=f"'{decoder}'.*one of 'conv', 'cell'.*'local'"):
            load(recipe, [f"{decoder}=local"])


def test_a_checkpoint_from_before_a_new_model_field_resumes():
    """A checkpoint saved before model.backbone.flatten_packed_rows existed was trained with its default: not a
    different model. A checkpoint saved when position_init was the core's names it at its default, which a recipe
    since need not. Asking for another value than the default still is a different model."""
    from perceptio_dist.config.extensions import with_extension_defaults
    from perceptio_dist.train.trainer import _model_differences, saved_model_fields

    cfg = load_config("tiny_cpu")
    current = with_extension_defaults(cfg)["model"]
    saved = cfg.to_dict()
    del saved["model"]["backbone"]["flatten_packed_rows"]
    saved["model"]["backbone"]["vision"]["position_init"] = "random"
    assert _model_differences(saved["model"], cfg.to_dict()["model"])  # compared raw: refused (what happened)
    assert _model_differences(saved_model_fields(saved), current) == []
    other = with_extension_defaults(load_config("tiny_cpu", ["model.backbone.vision.position_init=sincos_2d"]))
    assert _model_differences(saved_model_fields(saved), other["model"]) == [
        "model.backbone.vision.position_init: checkpoint 'random', recipe 'sincos_2d'"]


SAVED_BEFORE_EXPERIMENTS = ROOT / "tests" / "golden" / "saved_before_experiments"


@pytest.mark.parametrize("recipe", ["toy_spatial", "perceptio_8b"])
def test_configs_saved_before_the_toy_experiment_owned_its_fields_load(recipe):
    """Configs as checkpoints and exports wrote them when the toy world's fields were the core's (written by the
    code of commit 52a87b8, every field present): they load, the toy fields keep their values, nothing is lost, and
    the 8B recipe itself no longer shows them."""
    import yaml

    from perceptio_dist.config import dump_yaml
    from perceptio_dist.config.extensions import extension_value, with_extension_defaults
    from perceptio_dist.config.training import config_from_dict

    written = yaml.safe_load((SAVED_BEFORE_EXPERIMENTS / f"{recipe}.yaml").read_text())
    cfg = config_from_dict(written)
    assert with_extension_defaults(cfg) == written
    assert extension_value(cfg.model.backbone, "image_position") == written["model"]["backbone"]["image_position"]
    assert extension_value(cfg.data, "depth_context_noise") == written["data"]["depth_context_noise"]
    assert yaml.safe_load(dump_yaml(cfg)) == written  # and written back as it was
    toy_fields = ("position_init", "image_position", "code_embedding_init", "depth_context_noise")
    assert not any(name in dump_yaml(load_config("perceptio_8b")) for name in toy_fields)
    assert not any(name.endswith(toy_fields) for name, *_ in iter_field_docs(PerceptioConfig))


def test_sources_are_a_tagged_union(tmp_path):
    """Each source type holds only its own fields: `type` picks the dataclass (synthetic when missing), a field of
    another type is refused by name, and an unknown type lists the known ones."""
    from perceptio_dist.preprocess.config import RefcocoSource, SyntheticSource, load_preprocess_config

    def recipe(source: str) -> str:
        path = tmp_path / "recipe.yaml"
        path.write_text(f"output_dir: {tmp_path}/out\nsources:\n  - {source}\n")
        return str(path)

    cfg = load_preprocess_config(recipe("{path: /scenes, marker_grid: 4}"))
    assert type(cfg.sources[0]) is SyntheticSource and cfg.sources[0].marker_grid == 4
    cfg = load_preprocess_config(recipe("{type: refcoco, path: /refer, dataset: refcocog}"))
    assert type(cfg.sources[0]) is RefcocoSource and cfg.sources[0].dataset == "refcocog"
    with pytest.raises(ConfigError, match=r"unknown key 'sources\[0\]\.dataset'"):
        load_preprocess_config(recipe("{type: synthetic, path: /scenes, dataset: refcocog}"))
    with pytest.raises(ConfigError, match=r"'sources\[0\]\.type': expected one of 'synthetic', 'refcoco'.*got 'tfrecord'"):
        load_preprocess_config(recipe("{type: tfrecord, path: /x}"))
    with pytest.raises(ConfigError, match=r"'sources\[0\]\.marker_step'"):
        load_preprocess_config(recipe("{path: /scenes, marker_step: true}"))


# What each shipped preprocessing recipe's shards depend on (preprocess/job.py's producer "contents"), as computed
# by the code before the components owned their configs (commit 52a87b8): moving fields between dataclasses must
# rebuild no shard.
CONTENTS_BEFORE_THE_CONFIG_SPLIT = {"preprocess_8b_codes": "d70c892378c6d880", "preprocess_8b_teacher": "fad62ddc353e123d",
                                    "preprocess_tiny": "144fd11ae069699d", "preprocess_toy": "6e1790badb0a680d"}


def test_shard_contents_identity_survives_the_config_split():
    from perceptio_dist.preprocess.config import load_preprocess_config
    from perceptio_dist.preprocess.job import producer

    ids = {"depth_tokenizer": None, "teacher": None}
    assert set(recipe_names("preprocess")) == set(CONTENTS_BEFORE_THE_CONFIG_SPLIT)
    for name, contents in CONTENTS_BEFORE_THE_CONFIG_SPLIT.items():
        assert producer(load_preprocess_config(name), ids)["contents"] == contents, name
