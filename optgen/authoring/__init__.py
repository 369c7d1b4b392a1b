"""Tools for spec authors: ``optgen new``, ``optgen test``, ``optgen doc`` and the cost model of
``optgen show``. They sit above the pipeline (spec -> IR -> features -> backends -> runtime) and
below the CLI, which only dispatches to them."""
