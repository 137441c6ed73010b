from crm_platform.migrations import run_env
from sales.repository import metadata

run_env(metadata)
