"""Text-to-SQL: a question about a database, answered with one SQLite query, scored by running it.

    prompts.py     schema + question -> chat messages (system prompt, compact schema)
    synthetic.py   an offline generator of verified examples (`slm sql-data`)
    execution.py   SQLite execution with limits, and seeded databases for schema-only contexts
    scoring.py     `slm eval-sql`: generate, extract the SQL, execute, compare
"""
