from crm_platform.migrations import run_env
from leads.repository import metadata

run_env(metadata)
