"""Money: what a machine costs (billing units, minimums), the shipped price table, the budget
check before a run, and the cost report over the ledger."""
