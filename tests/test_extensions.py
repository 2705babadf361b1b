"""One way to extend each axis: a loss, a condition kind and a launcher, each one registry entry
plus one config file in a package outside the project, run through plan -> launch -> collect ->
figures with no change to the project's code."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from benchmark import cell as cells
from benchmark import results, tables
from benchmark.cli import main
from benchmark.study import load_option, options

PACKAGE = {
    # Registrations: torch-free, imported at plan time through the config's `plugins`.
    "__init__.py": """
        from benchmark.conditions import CONDITIONS, ConditionKind
        from benchmark.loss_kinds import LOSSES, LossKind
        from benchmark.schema import NonNegative, Seed, Strict
        from launchers import LAUNCHERS


        class NoKeys(Strict):
            pass


        class NoiseKeys(Strict):
            kind: str
            sigma: NonNegative
            seed: Seed


        LOSSES.register("ext_clean_ce", LossKind("ext_clean_ce", NoKeys, "ext_plugin.compute:clean_ce"))
        CONDITIONS.register("ext_noise", ConditionKind(
            measure="ext_plugin.compute:noise", schema=NoiseKeys,
            describe=lambda cfg: {"attack": f"gaussian-noise(sigma={cfg['sigma']})"}))
        LAUNCHERS.register("ext_inline", "ext_plugin.inline:InlineLauncher")
    """,
    # The computations: torch, imported only where a cell runs.
    "compute.py": """
        import torch
        import torch.nn.functional as F


        def clean_ce(model, x, x_adv, y, params):
            logits = model(x)
            return F.cross_entropy(logits, y), logits


        def noise(ctx, cfg):
            generator = torch.Generator().manual_seed(cfg["seed"])
            noisy = (ctx.x + cfg["sigma"] * torch.randn(ctx.x.shape, generator=generator)).clamp(0, 1)
            return ctx.predict(noisy) == ctx.y
    """,
    "inline.py": """
        from benchmark.errors import RFTBenchError
        from benchmark.schema import Strict
        from launchers import Launcher


        class InlineConfig(Strict):
            name: str
            kind: str
            note: str


        class InlineLauncher(Launcher):
            kind = "ext_inline"
            schema = InlineConfig

            def launch(self, study, todo):
                from benchmark.run import Runtime, run_cell

                for cell in todo:
                    run_cell(cell.directory(study.dir), Runtime.from_config(study.config), job=self.job_record())
                return 0

            def submit_workers(self, study, fn, n, name):
                raise RFTBenchError("ext_inline runs no workers")

            @classmethod
            def cancel(cls, study, todo):
                return 0

            @classmethod
            def job_states(cls, records):
                return {}
    """,
}
CONFIGS = {
    "loss/ext_clean_ce.yaml": """
        defaults: [_training_attack, _self_]
        name: ext_clean_ce
        kind: ext_clean_ce
        study_name: null
    """,
    "eval/ext_noise.yaml": """
        # @package eval
        ext_noise:
          kind: ext_noise
          sigma: 0.1
          seed: 0
    """,
    "launcher/ext_inline.yaml": """
        name: ext_inline
        kind: ext_inline
        note: runs cells in the launching process
    """,
}
ARGS = ["study=demo", "model=test_resnet.demo", "protocol=fft5", "loss=ext_clean_ce", "eval=[clean,ext_noise]",
        "launcher=ext_inline", "plugins=[ext_plugin]", "dataset.test_size=30"]


@pytest.fixture(scope="module")
def extension(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The extension package and config folder, importable and on the config path for this
    module's tests (once: a registry refuses a second, different registration of a name)."""
    root = tmp_path_factory.mktemp("extension")
    for files, folder in ((PACKAGE, root / "src" / "ext_plugin"), (CONFIGS, root / "conf")):
        for name, text in files.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(textwrap.dedent(text).lstrip())
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(root / "src"))
        patch.setenv("RFTBENCH_CONF_PATH", str(root / "conf"))
        yield root
    load_option.cache_clear()  # the extension's options leave with it


def test_an_extension_is_listed_and_its_values_are_checked(extension, roots, capsys):
    assert "ext_clean_ce" in options("loss") and "ext_noise" in options("eval")
    assert main(["plan", *ARGS, "--format", "json"]) == 0
    assert main(["plan", *ARGS, "eval.ext_noise.sigma=-1"]) == 2
    assert "eval.ext_noise.sigma=-1" in capsys.readouterr().err
    assert main(["plan", *ARGS, "+launcher.other=1"]) == 2
    assert "launcher.other is not a known key" in capsys.readouterr().err


@pytest.mark.slow
def test_a_loss_a_condition_and_a_launcher_from_a_plugin_run_end_to_end(extension, roots, tmp_path):
    assert main(["launch", *ARGS]) == 0
    study_dir = roots["results"] / "demo"
    (cell_dir,) = (study_dir / cells.CELLS_DIR).iterdir()
    assert cells.read_state(cell_dir)["launcher_kind"] == "ext_inline"
    rows = results.read_rows(cell_dir / cells.ROWS_FILE).to_pandas().set_index("condition")
    assert list(rows.index) == ["clean", "ext_noise"] and rows.loc["ext_noise", "attack"] == "gaussian-noise(sigma=0.1)"
    assert rows.loc["clean", "loss"] == "ext_clean_ce"
    assert main(["collect", "study=demo"]) == 0
    long = tables.load("demo")
    assert set(long["condition"]) == {"clean", "ext_noise"} and set(long["loss"]) == {"ext_clean_ce"}
    out = tmp_path / "figures"
    assert main(["figures", "study=demo", "--out", str(out)]) == 0
    assert "ext_noise" in (out / "report.html").read_text()
