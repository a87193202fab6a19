"""The commands beside training, answering and exporting: showing a recipe's data (`qadapt data`),
sweeping a recipe's keys (`qadapt sweep`, each job in its own process) and comparing runs (`qadapt report`,
and the result files a sweep keeps)."""
