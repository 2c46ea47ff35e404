"""The synchronous schedule written out by hand, without the pipeline's producer thread.

    python tests/integration/sync_reference.py [key=value ...]

generate -> verify -> share -> score -> update -> sync, step after step, then the HF export.
test_pipeline.py checks that `pipeline.max_staleness=0` gives exactly these weights.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from scope_ds.checkpoint import export_hf  # noqa: E402
from scope_ds.config import load_config  # noqa: E402
from scope_ds.data.stream import prompt_stream  # noqa: E402
from scope_ds.pipeline import build_run, stages  # noqa: E402
from scope_ds.pipeline.collectives import share  # noqa: E402
from scope_ds.records import Batch  # noqa: E402
from scope_ds.train import DEFAULT_RECIPE  # noqa: E402


def main() -> None:
    cfg = load_config(DEFAULT_RECIPE, [a for a in sys.argv[1:] if not a.startswith("--local")])
    run = build_run(cfg)
    prompts = prompt_stream(run.records, cfg.data.seed)
    try:
        for step in range(cfg.train.steps):
            batch = None
            if run.rank == 0:
                batch = Batch(step=step, records=[next(prompts) for _ in range(cfg.train.prompts_per_step)])
                stages.generate(run, batch)
                stages.verify(run, batch)
            batch = share(batch)
            stages.score(run, batch)
            stages.update(run, batch)
            stages.sync(run)
            run.log.rollouts(step + 1, batch.rollouts)
        export_hf(run, str(Path(run.run_dir) / "hf"))
    finally:
        run.close()


if __name__ == "__main__":
    main()
