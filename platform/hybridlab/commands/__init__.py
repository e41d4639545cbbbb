"""The command groups of the ``hybridlab`` CLI, one module each; ``hybridlab.cli`` mounts them.

``models``   check, zoo, generate
``jobs``     run, mlflow-replay
``cluster``  submit, status, logs, stop
``results``  eval, compare, ui
``data``     data prepare
``bench``    bench ssm, bench decode, bench train
``interop``  import mamba-ssm, export mamba-ssm

Each command is a thin shell over the module that owns the concept; typer checks
the options (ranges, choices); heavy imports (ray, deepspeed, mlflow) happen inside
the command functions so that ``hybridlab check`` stays fast. No module here imports
``hybridlab.cli``.
"""
