// The console end to end in headless Chromium, against a live gateway and the mock upstream:
// log in, the overview's charts after a burst of calls, a policy with an invalid field and
// its message, fixed and saved, a stale-etag conflict between two tabs, a key created and
// revoked, the usage explorer, and the playground against two models.
// Usage: node e2e.mjs BASE_URL ADMIN_TOKEN SCREENSHOT_DIR   (CHROMIUM: the browser binary)
import { chromium } from "playwright-core";
import assert from "node:assert/strict";
import { mkdirSync } from "node:fs";

const [base, token, shots] = process.argv.slice(2);
mkdirSync(shots, { recursive: true });
const step = (s) => console.log(`--- ${s}`);

// A burst of calls through the JSON API (like any caller), so the overview has data.
async function call(model, text) {
  const res = await fetch(`${base}/llmgateway.v1.LlmGateway/Chat`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ model, messages: [{ role: "ROLE_USER", content: [{ text }] }] }),
  });
  return res.status;
}
step("a burst of calls");
const statuses = await Promise.all([
  ...Array.from({ length: 12 }, (_, i) => call("mock/echo", `hello ${i}`)),
  ...Array.from({ length: 6 }, (_, i) => call("openai/gpt-4o-mini", `hi ${i}`)),
  ...Array.from({ length: 3 }, () => call("openai/gpt-4o-mini+status=500", "fail")),
]);
assert.equal(statuses.filter((s) => s === 200).length, 18, `statuses: ${statuses}`);
assert.equal(statuses.filter((s) => s === 503).length, 3, `statuses: ${statuses}`);

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
});
const errors = [];
try {
  const context = await browser.newContext({ viewport: { width: 1400, height: 1000 } });
  const page = await context.newPage();
  page.on("pageerror", (e) => errors.push(String(e)));
  page.on("console", (m) => { if (m.type() === "error") errors.push(m.text()); });

  step("log in");
  await page.goto(`${base}/console`);
  await page.locator("#login").waitFor({ state: "visible" });
  await page.fill("#token", "not-the-token-at-all");
  await page.click("#login-form button");
  await page.locator("#login-error").filter({ hasText: /./ }).waitFor();
  await page.fill("#token", token);
  await page.click("#login-form button");
  await page.locator("#overview").waitFor({ state: "visible" });
  // The secret is nowhere in the page or its storage; the session cookie is HttpOnly.
  assert.ok(!(await page.content()).includes(token), "the token is in the page");
  const cookies = await context.cookies();
  assert.ok(cookies.some((c) => c.name === "lgw_console" && c.httpOnly && c.sameSite === "Strict"), JSON.stringify(cookies));
  assert.equal(await page.evaluate(() => document.cookie), "");

  step("overview charts");
  await page.click("#ov-refresh");
  await page.locator("#ch-calls svg path[data-series]").first().waitFor();
  const series = await page.locator("#ch-calls svg path[data-series]").evaluateAll((ps) => ps.map((p) => p.dataset.series));
  assert.ok(series.includes("mock") && series.includes("openai"), `series: ${series}`);
  await page.locator("#ov-errors td", { hasText: "UNAVAILABLE" }).waitFor();
  const calls = await page.locator("#ov-totals div").first().textContent();
  assert.match(calls, /calls\s*2\d/, calls);
  await page.screenshot({ path: `${shots}/overview.png`, fullPage: true });

  step("a policy with an invalid field, then fixed");
  await page.click('nav a[data-page="policies"]');
  await page.click("#pol-new");
  await page.fill("#pol-json", JSON.stringify({ name: "e2e-policy", targets: [{ provider: "nope", model: "x" }] }, null, 2));
  await page.click("#pol-save");
  const violation = page.locator("#pol-messages .violation");
  await violation.waitFor();
  assert.match(await violation.textContent(), /policy\.targets\[0\]\.provider: `nope` is not a configured provider/);
  await page.screenshot({ path: `${shots}/policy-invalid.png`, fullPage: true });
  await page.fill("#pol-json", JSON.stringify({ name: "e2e-policy", targets: [{ provider: "mock", model: "echo" }, { provider: "openai", model: "gpt-4o-mini" }] }, null, 2));
  await page.click("#pol-save");
  await page.locator("#pol-messages .ok", { hasText: "saved: etag" }).waitFor();
  await page.locator("#pol-list a", { hasText: "e2e-policy" }).waitFor();
  await page.click("#pol-explain");
  await page.locator("#pol-plan td", { hasText: "mock/echo" }).waitFor();
  await page.screenshot({ path: `${shots}/policy-saved.png`, fullPage: true });

  step("two tabs, one etag: the second save is a conflict");
  const other = await context.newPage();
  await other.goto(`${base}/console#policies`);
  for (const p of [page, other]) {
    await p.locator("#pol-list a", { hasText: "e2e-policy" }).click();
    await p.locator("#pol-editor").waitFor({ state: "visible" });
  }
  for (const [p, text] of [[page, "first"], [other, "second"]]) {
    const policy = JSON.parse(await p.inputValue("#pol-json"));
    policy.description = `edited in the ${text} tab`;
    await p.fill("#pol-json", JSON.stringify(policy, null, 2));
  }
  await page.click("#pol-save");
  await page.locator("#pol-messages .ok").waitFor();
  await other.click("#pol-save");
  await other.locator("#pol-messages .conflict").waitFor();
  assert.match(await other.locator("#pol-messages").textContent(), /aborted: policy `e2e-policy` was changed concurrently/);
  await other.screenshot({ path: `${shots}/policy-conflict.png`, fullPage: true });
  await other.close();

  step("create and revoke a key");
  await page.click('nav a[data-page="keys"]');
  await page.fill('#key-form input[name="name"]', "e2e-key");
  await page.fill('#key-form input[name="owner"]', "team-e2e");
  await page.fill('#key-form input[name="dailyBudgetUsd"]', "5");
  await page.click("#key-form button");
  const secret = await page.locator("#new-secret").textContent();
  assert.ok(secret.length > 20, `secret: ${secret}`);
  const row = page.locator("#key-list tr", { hasText: "e2e-key" });
  await row.waitFor();
  await page.screenshot({ path: `${shots}/keys.png`, fullPage: true });
  // The new key works as a chat key.
  const keyed = await fetch(`${base}/llmgateway.v1.LlmGateway/Chat`, {
    method: "POST",
    headers: { "content-type": "application/json", authorization: `Bearer ${secret}` },
    body: JSON.stringify({ model: "mock/echo", messages: [{ role: "ROLE_USER", content: [{ text: "with a key" }] }] }),
  });
  assert.equal(keyed.status, 200);
  page.once("dialog", (d) => d.accept());
  await row.locator("button.revoke").click();
  await page.locator("#key-list tr", { hasText: "e2e-key" }).locator("td", { hasText: "revoked" }).waitFor();
  const revoked = await fetch(`${base}/llmgateway.v1.LlmGateway/Chat`, {
    method: "POST",
    headers: { "content-type": "application/json", authorization: `Bearer ${secret}` },
    body: JSON.stringify({ model: "mock/echo", messages: [{ role: "ROLE_USER", content: [{ text: "revoked" }] }] }),
  });
  assert.equal(revoked.status, 401);

  step("usage explorer");
  await page.click('nav a[data-page="usage"]');
  await page.click("#us-run");
  await page.locator("#us-table tbody tr").first().waitFor();
  assert.ok((await page.locator("#us-table tbody tr").count()) >= 2);
  await page.screenshot({ path: `${shots}/usage.png`, fullPage: true });

  step("playground: one prompt, two models, streaming");
  await page.click('nav a[data-page="playground"]');
  const models = page.locator(".pg-model");
  await models.nth(0).fill("mock/echo");
  await models.nth(1).fill("e2e-policy");
  await page.click("#pg-run");
  await page.locator('.stats[data-done="1"]').nth(1).waitFor();
  const replies = await page.locator("#pg-results .reply").allTextContents();
  assert.equal(replies.length, 2);
  assert.match(replies[0], /You said: Write one sentence about the sea/);
  const stats = await page.locator("#pg-results .stats").allTextContents();
  for (const s of stats) assert.match(s, /latency [\d.]+ s · TTFT [\d.]+ s · tokens \d+ in \/ \d+ out · cost \$/);
  await page.screenshot({ path: `${shots}/playground.png`, fullPage: true });

  step("log out");
  await page.click("#logout");
  await page.locator("#login").waitFor({ state: "visible" });
  const after = await fetch(`${base}/llmgateway.v1.LlmGatewayAdmin/ListPolicies`, {
    method: "POST",
    headers: { "content-type": "application/json", cookie: (await context.cookies()).map((c) => `${c.name}=${c.value}`).join("; ") },
    body: "{}",
  });
  assert.equal(after.status, 401);
  assert.deepEqual(errors.filter((e) => !/401|Unauthorized|status of 40[0-9]/.test(e)), []);
} finally {
  await browser.close();
}
console.log("console e2e: all passed");
