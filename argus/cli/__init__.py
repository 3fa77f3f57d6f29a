"""The `argus` command line: one module per command group, assembled here.

Command modules import only `_common` (consoles, options, errors), `stage_view` and `report`, never each
other; what a command needs from the platform it imports inside the command, so `argus sandbox serve`
starts in an image that has the code executor's dependencies and nothing else.
"""

from __future__ import annotations

import typer

from argus.cli import data, eval, flows, k8s, models, run, runs, sandbox, search, serving, spec, stack, train

app = typer.Typer(help="Argus: the DeepEyesV2 recipe as a platform.", no_args_is_help=True, add_completion=False)

app.command("version")(spec.version_command)
app.command("validate")(spec.validate_command)
app.command("run")(run.run_command)
app.command("eval")(eval.eval_command)
app.command("promote")(serving.promote_command)
app.command("rollback")(serving.rollback_command)
# `argus deploy` was the first name of `argus flows deploy`; kept so scripts that call it still work.
app.command("deploy", hidden=True)(flows.deploy_command)
for name, group in (
    ("stack", stack.app),
    ("sandbox", sandbox.app),
    ("search", search.app),
    ("data", data.app),
    ("models", models.app),
    ("train", train.app),
    ("runs", runs.app),
    ("serving", serving.app),
    ("flows", flows.app),
    ("k8s", k8s.app),
):
    app.add_typer(group, name=name)


def main() -> None:
    app()
