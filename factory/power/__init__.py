"""Power: budgets in watts, the governor that holds replicas to them, and `factory power`."""
