-- phaseflow's durable state. Every table lives in the `phaseflow` schema (created by the
-- migrator before this file runs) so the library can share a database with its application.
--
-- State columns are plain text parsed by phaseflow (`RunState::from_str` and friends), not
-- CHECK-constrained enums: a value phaseflow does not know surfaces as a typed `store_decode`
-- error naming the table, column and value, and adding a state needs no table rewrite.

CREATE TABLE phaseflow.runs (
    id            uuid        PRIMARY KEY,
    workflow      text        NOT NULL,
    subject       text        NOT NULL,
    worktree      text        NOT NULL,
    state         text        NOT NULL,
    paused_from   text,
    current_phase text,
    -- The seq of the run's last event; bumped under the run's row lock, so seqs are gapless.
    last_seq      bigint      NOT NULL DEFAULT 0,
    created_at    timestamptz NOT NULL,
    updated_at    timestamptz NOT NULL
);

CREATE TABLE phaseflow.run_phases (
    run_id        uuid    NOT NULL REFERENCES phaseflow.runs (id) ON DELETE CASCADE,
    key           text    NOT NULL,
    position      integer NOT NULL,
    state         text    NOT NULL,
    attempts      bigint  NOT NULL DEFAULT 0,
    round_repairs bigint  NOT NULL DEFAULT 0,
    repair        boolean NOT NULL DEFAULT false,
    instructions  text,
    feedback      text,
    owner         uuid,
    PRIMARY KEY (run_id, key),
    UNIQUE (run_id, position)
);

-- No foreign key to runs: every command appends events, and a per-row foreign-key check is a
-- query of its own; events are only ever appended under the run's row lock, by phaseflow.
CREATE TABLE phaseflow.run_events (
    run_id  uuid        NOT NULL,
    seq     bigint      NOT NULL,
    key     text        NOT NULL,
    type    text        NOT NULL,
    phase   text,
    payload jsonb       NOT NULL,
    at      timestamptz NOT NULL,
    PRIMARY KEY (run_id, seq),
    UNIQUE (run_id, key)
);

CREATE TABLE phaseflow.sessions (
    id                uuid        PRIMARY KEY,
    run_id            uuid        NOT NULL REFERENCES phaseflow.runs (id) ON DELETE CASCADE,
    role              text        NOT NULL,
    state             text        NOT NULL,
    last_dedup        text,
    last_prompt_at    timestamptz,
    recovery_attempts bigint      NOT NULL DEFAULT 0,
    last_capture_seq  bigint      NOT NULL DEFAULT 0,
    -- Insertion order, so `sessions()` lists a run's sessions in the order they were recorded.
    created_seq       bigint      GENERATED ALWAYS AS IDENTITY,
    UNIQUE (run_id, role)
);

CREATE TABLE phaseflow.artifacts (
    id          uuid        PRIMARY KEY,
    run_id      uuid        NOT NULL REFERENCES phaseflow.runs (id) ON DELETE CASCADE,
    phase       text        NOT NULL,
    attempt     bigint      NOT NULL,
    path        text        NOT NULL,
    hash        text        NOT NULL,
    schema_id   text        NOT NULL,
    size        bigint      NOT NULL,
    content     jsonb,
    errors      jsonb       NOT NULL,
    recorded_at timestamptz NOT NULL,
    -- Insertion order: "the most recently recorded artifact" without trusting clock ties.
    recorded_seq bigint     GENERATED ALWAYS AS IDENTITY,
    UNIQUE (run_id, path, hash)
);

CREATE INDEX artifacts_latest_per_phase ON phaseflow.artifacts (run_id, phase, recorded_seq);

CREATE TABLE phaseflow.approval_requests (
    id            uuid        PRIMARY KEY,
    run_id        uuid        NOT NULL REFERENCES phaseflow.runs (id) ON DELETE CASCADE,
    phase         text        NOT NULL,
    attempt       bigint      NOT NULL,
    gate          text        NOT NULL,
    kind          text        NOT NULL,
    -- `{run}:{gate}:{phase}:{attempt}`
    key           text        NOT NULL UNIQUE,
    payload       jsonb       NOT NULL,
    -- The decision as phaseflow serialises it (`{"decision": "rework", "feedback": …}`).
    decision      jsonb,
    decided_by    text,
    decision_note text,
    decided_at    timestamptz,
    created_at    timestamptz NOT NULL,
    created_seq   bigint      GENERATED ALWAYS AS IDENTITY
);

CREATE INDEX approval_requests_by_run ON phaseflow.approval_requests (run_id, created_seq);

CREATE TABLE phaseflow.transcript_chunks (
    session_id uuid   NOT NULL REFERENCES phaseflow.sessions (id) ON DELETE CASCADE,
    seq        bigint NOT NULL,
    text       text   NOT NULL,
    PRIMARY KEY (session_id, seq)
);
