"""What the user asked for: chains, the plan of a job, and the columns they make.

``chain`` (a user's runnable with its inputs and outputs), ``plan`` (the
job's chains in dependency order, resolved against the frame's columns),
``outputs`` and ``columns`` (output specs, dtypes, meta), ``fingerprint``
(what identifies a chain across runs), ``graph`` (walking and rewriting a
runnable's tree) and ``shipping`` (sending chains and keys to workers).
"""
