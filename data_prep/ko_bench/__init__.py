"""A small Korean benchmark about the subjects and forms of the demo data, as lm-evaluation-harness tasks over the
JSONL files beside this file (``generate.py`` writes them; ``tasks.py`` loads and scores them).

    # by hand, as `make eval` runs them: multiple choice on the plain prompt, short answers with the chat template
    lm_eval --model hf --model_args pretrained=runs/<run>/sft/final --include_path data_prep/ko_bench --tasks ko_bench_mc
    lm_eval --model hf --model_args pretrained=runs/<run>/sft/final --include_path data_prep/ko_bench \\
            --tasks ko_bench_short --apply_chat_template
"""

from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
