"""How cells are dispatched. Each launcher module offers the same three functions:

    check(study) -> None                raise RFTBenchError if the cells cannot be launched
                                        (called before anything is written)
    launch(study, cells) -> exit code   run or submit the given (pending) cells
    cancel(study, cells) -> exit code   stop the given cells if queued or running

`conf/launcher/<name>.yaml` selects `launchers/<name>.py`. A launcher never knows what a loss
or a model is: it hands a cell directory and the runtime to `benchmark.run.run_cell`.
"""
