from crm_platform.migrations import run_env
from service_desk.repository import metadata

run_env(metadata)
