from crm_platform.migrations import run_env
from gateway.security.store import metadata

run_env(metadata)
