from aiwriter.errors import ApiError


class InsufficientBalance(ApiError):
    status_code = 402
    code = "insufficient_balance"
    message = "Your credit balance is too low for this request."


class QuotaExceeded(ApiError):
    status_code = 429
    code = "quota_exceeded"
    message = "Your monthly quota is used up."


class KeyBudgetExceeded(ApiError):
    status_code = 429
    code = "key_budget_exceeded"
    message = "This API key's monthly budget is used up."
