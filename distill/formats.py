"""The Parquet contracts between stages.

Generation writes `DIR/data/*.parquet` (chat examples without the task prompt, `DATA_SCHEMA`),
`DIR/rejects/*.parquet` (`REJECT_SCHEMA`) and `DIR/manifest.json`. Training reads `DIR/data`; so does
`datasets.load_dataset("parquet", data_dir=DIR + "/data")`.
"""

from __future__ import annotations

import pyarrow as pa

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])

# Valid queries after the input checks (generation's staging area, `DIR/_work/queries`).
QUERY_SCHEMA = pa.schema([
    ("id", pa.string()), ("text", pa.string()), ("gold", pa.string()), ("row", pa.int64()),
])

DATA_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("text", pa.string()),                      # the query, as the student sees it
    ("messages", pa.list_(MESSAGE)),            # user + assistant only: never the task prompt
    ("answer", pa.string()),                    # what the student learns (the assistant message)
    ("label", pa.string()),                     # the parsed label (label tasks), else null
    ("gold", pa.string()),                      # the input's gold label, if it had one
    ("teacher_output", pa.string()),            # raw teacher text, reasoning included (for audit)
    ("reasoning", pa.string()),                 # the stripped <think> part, if any
    ("prompt_tokens", pa.int32()),              # teacher prompt tokens (long prompt + query)
    ("output_tokens", pa.int32()),              # teacher output tokens, reasoning included
    ("teacher", pa.string()),
    ("task", pa.string()),
    ("attempt", pa.int32()),                    # 0 = first try; >0 = after that many retries
    ("samples", pa.int32()),                    # teacher samples drawn for this query
    ("agreement", pa.float32()),                # fraction of samples that gave the chosen answer
    ("teacher_token_ids", pa.list_(pa.int32())),  # the chosen sample's answer tokens (after any reasoning)
    ("reasoning_token_ids", pa.list_(pa.int32())),  # a thinking teacher's tokens before them (reasoning, </think>):
    #                                                 the context its soft labels are scored in
    ("topk_ids", pa.list_(pa.list_(pa.int32()))),  # per answer token: the teacher's top-k token ids
    ("topk_logprobs", pa.list_(pa.list_(pa.float32()))),  # ... and their log-probabilities
])

REJECT_SCHEMA = pa.schema([
    # A duplicate input row keeps its (taken) id, so ids repeat here; `row` identifies the input row.
    ("id", pa.string()),
    ("row", pa.int64()),                        # position in the input (all files in order)
    ("text", pa.string()),
    ("reason", pa.string()),
    ("stage", pa.string()),                     # "input" (before any engine) or "teacher"
    ("teacher_output", pa.string()),
])
