from analytics.repository import metadata
from crm_platform.migrations import run_env

run_env(metadata)
