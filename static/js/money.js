// The one money format (docs/usage-and-billing.md): the server's decimal string, trailing zeros stripped,
// never an exponent and never through a float. "0.0005725000" -> "0.0005725 CNY", "0E-10" -> "0 CNY".

export function moneyText(value) {
  if (value === null || value === undefined || value === "") return "";
  let text = String(value).trim();
  const exp = text.match(/^(-?)(\d+)(?:\.(\d+))?[eE]([+-]?\d+)$/);
  if (exp) {
    // An exponent form from anywhere: move the point in the digits, exactly.
    const [, sign, whole, frac = "", power] = exp;
    let digits = whole + frac;
    let point = whole.length + Number(power);
    if (point <= 0) { digits = "0".repeat(1 - point) + digits; point = 1; }
    if (point > digits.length) digits += "0".repeat(point - digits.length);
    text = `${sign}${digits.slice(0, point)}.${digits.slice(point)}`;
  }
  if (text.includes(".")) text = text.replace(/0+$/, "").replace(/\.$/, "");
  text = text.replace(/^(-?)0+(?=\d)/, "$1");
  if (/^-?0$/.test(text)) text = "0";
  return text;
}

export function formatMoney(value, currency = "") {
  const text = moneyText(value);
  if (text === "") return "";
  return `${text} ${currency || ""}`.trim();
}
