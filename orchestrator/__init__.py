"""dreamsweep's sweep orchestrator: specs -> Ray Tune + Optuna -> MLflow. Knows nothing of NeRFs.

    spec/    what a sweep is
      spec.py       SweepSpec and its validation (field paths in every error)
      prompts.py    prompt sources (inline, library JSON, text, CSV/Parquet/Arrow) -> one Arrow table
      space.py      search space -> Optuna distributions and samplers (T_min < T_max by construction)
    run/     where and how it runs
      workspace.py  where the stores live; the registry of sweeps
      cluster.py    which Ray cluster (local by default; `address` joins one)
      tuner.py      builds / restores the Tuner: OptunaSearch on a persistent study, ASHA, retries
      trainable.py  the Tune trainable: per-worker prior cache, trainer callbacks -> MLflow and Tune
      sweep.py      submit / resume / finalize
      fake_trainer.py  a trainer of known cost for plumbing tests and the overhead benchmark
    track/   what it leaves behind
      tracking.py   MLflow: parent run, durable trial -> run map (tags), metrics that survive resumes
      progress.py   the live console view and the parent run's best-so-far (a Tune callback)
      report.py     status / compare (one sweep or several) / best / the report's data
      page.py       the report page: self-contained HTML, renders side by side, Optuna's plots
    internals.py  the private Ray/Optuna/MLflow details relied on (each tested in tests/test_internals.py)
    cli.py   the `dreamsweep` command

Arrows go orchestrator -> trainers only: `trainers/` imports nothing from here.
"""
