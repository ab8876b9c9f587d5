"""Code used by both the functions and the runner: task model, stores, dispatch, storage, safety."""
