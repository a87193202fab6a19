"""Built-in training and test data, generated from a seed: nothing to download.

    arithmetic              one- and two-step sums with worked rationales (builtin:arithmetic)
    word_problems           grade-school word problems in many shapes (builtin:word-problems)
    conversation_problems   the same problems as multi-turn conversations (builtin:conversations)

qadapt.data reads them by their `builtin:` names.
"""
