"""The earlier home of the hook for timm's train.py, kept so that recipes and run folders naming `timm_st.hook`
(in `device_modules`, or `task: timm_st.hook:create_task`) run as before; the hook is `timm_st.commands.hook`."""
import logging
import os
import sys

from .commands.hook import STATE, activate, create_task
from .runs.hook import is_timm_train_script

__all__ = ['STATE', 'activate', 'create_task']

if is_timm_train_script(sys.modules.get('__main__')) and os.environ.get('RANK', '0') == '0':
    logging.getLogger(__name__).warning(
        'timm_st.hook is now timm_st.commands.hook: name that in the recipe (device_modules, task)')
