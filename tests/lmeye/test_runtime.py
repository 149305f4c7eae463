import pytest

from lmeye.runtime import FORWARD_CREDENTIALS, storage_runtime_env

SECRETS = {"AWS_ACCESS_KEY_ID": "AKIAEXAMPLE", "AWS_SECRET_ACCESS_KEY": "s3cr3t", "AWS_SESSION_TOKEN": "tok",
           "FSSPEC_S3_SECRET": "s3cr3t2"}
SETTINGS = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_DEFAULT_REGION": "eu-west-1"}


@pytest.fixture
def driver_env(monkeypatch):
    monkeypatch.delenv(FORWARD_CREDENTIALS, raising=False)
    for key in list(__import__("os").environ):
        if key.startswith(("AWS_", "FSSPEC_")):
            monkeypatch.delenv(key)
    for key, value in (SECRETS | SETTINGS).items():
        monkeypatch.setenv(key, value)
    return monkeypatch


def test_tasks_get_storage_settings_but_no_secrets_by_default(driver_env):
    assert storage_runtime_env() == {"env_vars": SETTINGS}


def test_credentials_are_shipped_only_on_explicit_opt_in(driver_env):
    driver_env.setenv(FORWARD_CREDENTIALS, "1")
    assert storage_runtime_env() == {"env_vars": SECRETS | SETTINGS}


def test_a_tasks_runtime_env_shows_no_secret(driver_env, ray_local):
    """What Ray's dashboard and state API show for a task: its runtime_env."""
    @ray_local.remote
    def shown():
        return ray_local.get_runtime_context().runtime_env.get("env_vars", {})

    env = ray_local.get(shown.options(runtime_env=storage_runtime_env()).remote())
    assert not set(SECRETS) & set(env) and not set(SECRETS.values()) & set(env.values())
    assert {k: env[k] for k in SETTINGS} == SETTINGS
