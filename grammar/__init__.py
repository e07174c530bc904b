"""The ssmc DSL grammar, shipped as package data (ssm.lark)."""
