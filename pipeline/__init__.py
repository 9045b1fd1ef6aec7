"""The RLHF pipeline for Gemma-family models: stages and tools over a shared core.

    pipeline/                 what a user runs, one module each (``python -m pipeline.<name>``)
      data sft rm ppo dpo     the stages, chained through the run directory: each reads only what an earlier stage
      report                  wrote there, through ``pipeline.core.rundir``; no stage imports another (dpo, like
                              ppo, starts from the SFT checkpoint or a model the recipe names; report compares every
                              model the run trained with the one it started from)
      launch plan inspect     tools: launch a stage under accelerate, plan memory offline, show a formatted example,
      bench publish           benchmark (bench drives the PPO stage's loop: the one tool that imports a stage),
      eval chat               publish a finished model to the Hugging Face Hub, evaluate every model on
                              lm-evaluation-harness, talk to a model; no tool imports another
    pipeline/core/            what the stages share: the recipe (config, typed, cli, locations) and its launch
                              (topology), the two kinds of failure a command reports (errors), the run directory
                              (rundir, atomic, checkpoint) and its one writer (writer), what a checkpoint carries
                              (notices, provenance), a failing process stopping the others (peers), models (loading,
                              embedded, devices, policy), where a stage starts and what it needs first (starts), a
                              training loop over processes (distributed), the Trainer
                              stages' run (trainer_stage, faults), one PPO update over prepared models (ppo_step),
                              generating and scoring (sampling) through the output heads (heads), Python reward
                              functions (rewards), pure math
                              (ppo_math, batching, reward_stats, korean), a stage's inputs checked against the data
                              stage's format (consistency), W&B and console progress (tracking, progress), benchmark
                              results as the report shows them (benchmarks); it never
                              imports a stage or a tool
    data_prep/                Gemma's chat format and the raw-rows-to-ids library; it never imports the pipeline

Imports run one way, ``data_prep`` <- ``pipeline.core`` <- stages and tools, because each layer is the vocabulary of
the one above it: the chat format and row formats know nothing of recipes or run directories, the core knows nothing
of what a stage does with it, and a stage knows other stages only by the files they leave.
``tests/test_architecture.py`` checks this on every test run.
"""
