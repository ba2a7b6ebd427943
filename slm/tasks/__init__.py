"""Tasks: what a model is asked to do and how it is scored, shared by fine-tuning, evaluation and serving.

    examples.py   read rows in several layouts (SQL and chat), normalize them to `Example`s, split
    encode.py     examples -> token ids with the loss on the completion only; padded, resumable batches
    sql/          text-to-SQL: prompts, synthetic data, execution in SQLite, scoring

Nothing here trains: recipes (slm/recipes) teach a task, `slm eval-sql` scores one.
"""
