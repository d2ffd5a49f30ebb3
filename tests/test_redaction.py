"""Credentials never leave the process: the one redaction helper."""

from __future__ import annotations

import pytest

from mnist_ablation.redaction import redact, redact_argv


@pytest.mark.parametrize("text, shown", [
    ("postgresql://alice:s3cret@db.example:5432/optuna", "postgresql://alice:***@db.example:5432/optuna"),
    ("postgresql+psycopg://alice:p%40ss@db/optuna", "postgresql+psycopg://alice:***@db/optuna"),
    ("https://bob:tok3n@mlflow.example/", "https://bob:***@mlflow.example/"),
    ("mysql://root:@localhost/db", "mysql://root:***@localhost/db"),
    ("cannot open postgresql://a:b@h/db (timeout) or http://c:d@e/", "cannot open postgresql://a:***@h/db (timeout) "
                                                                    "or http://c:***@e/"),
    ("postgresql://h/db?user=a&password=s3cret&sslmode=require", "postgresql://h/db?user=a&password=***&sslmode=require"),
    ("http://mlflow.example/?token=abc", "http://mlflow.example/?token=***"),
])
def test_passwords_in_urls_are_hidden(text, shown):
    assert redact(text) == shown


@pytest.mark.parametrize("text", ["sqlite:///mlruns/mlflow.db", "postgresql://alice@db/optuna", "http://127.0.0.1:5000",
                                  "a plain sentence: with a colon", "user:name@example.com"])
def test_text_without_credentials_is_unchanged(text):
    assert redact(text) == text


def test_command_lines_are_redacted_argument_by_argument():
    argv = ["python", "-m", "experiments.ablate", "--storage", "postgresql://alice:s3cret@db/optuna", "--seeds", "3"]
    assert redact_argv(argv) == [*argv[:4], "postgresql://alice:***@db/optuna", "--seeds", "3"]
