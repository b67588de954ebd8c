"""Reports: tables, figures, the HTML/Markdown report and the analysis of the experts."""
