from qadapt.cli import app

app()
