from qadapt.cli import run

run()
