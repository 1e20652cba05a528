from rmkernels_train.cli import entry

entry()
