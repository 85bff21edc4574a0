-- The prediction and label log (serving.quality.predlog): one row per instance of a
-- request, so a batched request of n instances is n rows (idx 0..n-1).
CREATE TABLE predictions (
    request_id text NOT NULL,
    idx int NOT NULL,
    model text NOT NULL,
    version text NOT NULL,
    arm text NOT NULL,           -- stable, canary, shadow, ...
    ts timestamptz NOT NULL,     -- when the request arrived
    inputs jsonb NOT NULL,       -- {input: {column: value} | nested list}, looked-up features included
    outputs jsonb NOT NULL,      -- {output: value of this instance}
    latency_ms real NOT NULL,
    degraded bool NOT NULL       -- answered with default features
);
-- Windows per model (accuracy, exports) and the join with labels.
CREATE INDEX predictions_model_ts ON predictions (model, ts);
CREATE INDEX predictions_request ON predictions (request_id, idx);

-- Delayed labels, one row per instance; a later label for the same (request_id, idx)
-- supersedes an earlier one (queries take the latest by ts).
CREATE TABLE labels (
    request_id text NOT NULL,
    idx int NOT NULL,
    label jsonb NOT NULL,
    ts timestamptz NOT NULL
);
CREATE INDEX labels_request ON labels (request_id, idx, ts);
