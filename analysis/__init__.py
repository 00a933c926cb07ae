"""Turn run directories into tables and plots."""
