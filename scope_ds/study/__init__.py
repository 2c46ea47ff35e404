"""Studies: the paper's comparison in one command (``python -m scope_ds.study STUDY.yaml``).

spec.py reads and checks a study file; runner.py trains and evaluates its runs, locally or on
SLURM, resumably; stats.py holds the table maths; report.py writes the table, JSON and plots.
"""

from scope_ds.study.spec import Study, StudyError, load_study

__all__ = ["Study", "StudyError", "load_study"]
