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


# Issue 24, finding 3: passwords holding quotes, spaces or "@", and sslpassword=, were shown.
@pytest.mark.parametrize("password", ["it's", 'say"hi"', "two words", "a@b@c", "p:w/x", "%40t", "q'u o\"t@e s"])
@pytest.mark.parametrize("template", [
    "postgresql://alice:{}@db.example:5432/optuna",
    "error: cannot open postgresql+psycopg://alice:{}@db/optuna (timeout)",
    "MLflow server at 'http://bob:{}@127.0.0.1:5000' is not reachable",
    "Traceback ...\n  url = \"https://bob:{}@mlflow.example\"\nConnectionError",
])
def test_any_character_in_a_password_is_hidden(template, password):
    shown = redact(template.format(password))
    assert password not in shown and "***" in shown
    assert shown.startswith(template.split("{}")[0].rsplit(":", 1)[0]), "the text before the secret stays"


@pytest.mark.parametrize("name", ["sslpassword", "password", "PASSWORD", "client_secret", "auth_token", "pwd"])
def test_secret_query_parameters_are_hidden(name):
    shown = redact(f"postgresql://db/optuna?sslmode=require&{name}=Hunter22x&user=a")
    assert "Hunter22x" not in shown and f"{name}=***" in shown and "sslmode=require" in shown and "user=a" in shown


def test_a_remembered_secret_is_hidden_wherever_it_appears():
    from mnist_ablation.redaction import remember_secrets

    remember_secrets("--tracking-uri=http://bob:Zq9 'x@y@127.0.0.1:5000/")
    assert redact("the server said: bad credentials Zq9 'x@y for bob") == "the server said: bad credentials *** for bob"
    remember_secrets("postgresql://db/x?sslpassword=Ssl%20Pw")
    assert "Ssl Pw" not in redact("key passphrase 'Ssl Pw' is wrong") and "Ssl%20Pw" not in redact("Ssl%20Pw")


def test_control_characters_print_as_escapes():
    from mnist_ablation.redaction import printable

    assert printable("arm\x1b[2J\x1b[31mred\r\n") == "arm\\x1b[2J\\x1b[31mred\\r\\n"
    assert printable("baseline <b>naïve</b>") == "baseline <b>naïve</b>"
    assert printable(" arm\n\x1b[2Jx", lines=True) == " arm\n\\x1b[2Jx", "a table keeps its rows, not the escapes"
