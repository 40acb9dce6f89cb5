"""What the commands do, as functions: ``scaffold`` (inspect → render → calibrate → validate →
write), ``calibrate`` (add an entry to an existing module), ``demo`` (the whole path on one model).

The workflow orchestrates the other layers — ``magsdk.inspect`` finds the conventions,
``magsdk.calibration`` runs the generations, ``magsdk.codegen`` only generates, patches and
validates code — and the CLI (``magsdk.commands``) only parses options and prints results.
"""
