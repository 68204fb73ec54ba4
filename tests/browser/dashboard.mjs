// Drives Ferry's dashboard in Debian's Chromium with playwright-core:
//   node dashboard.mjs   (env: FERRY_URL, FERRY_TOKEN, CHROMIUM, SCREENSHOTS)
// The Rust test has started a canary of version 2 (weight 10, wait for
// promote, weight 50, wait for promote, weight 100) under live traffic.
import { launch } from "./launch.mjs";

const url = process.env.FERRY_URL;
const token = process.env.FERRY_TOKEN;
const shots = process.env.SCREENSHOTS;
const fail = (msg) => { console.error("FAIL: " + msg); process.exit(1); };

const browser = await launch();
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
  page.on("dialog", (d) => d.accept()); // confirmations of destructive actions
  await page.goto(url + "/ui/#model=cancer");
  await page.getByRole("heading", { name: "Models" }).waitFor();

  // Without the token nothing is shown and an action is refused.
  await page.getByRole("button", { name: /^Abort/ }).click();
  await page.locator("#result.error").waitFor({ timeout: 5000 });
  const refused = await page.locator("#result").textContent();
  if (!/refused/.test(refused) || !/admin token/.test(refused)) fail("unauthenticated abort: " + refused);
  console.log("unauthenticated action refused: " + refused);

  // With the token from the link `ferry serve` prints: the models, the
  // canary at 10 %; the token leaves the address bar.
  await page.goto(url + "/ui/#model=cancer&token=" + token);
  await page.locator('.model[data-model="cancer"]').waitFor();
  const address = await page.evaluate(() => location.href);
  if (address.includes(token)) fail("the token stays in the address: " + address);
  if (!address.endsWith("#model=cancer")) fail("the model left the address: " + address);
  console.log("signed in from the link; address now " + address.replace(url, ""));
  await page.locator('[data-traffic="2"]', { hasText: "2: 10%" }).waitFor({ timeout: 15000 });
  await page.locator('#steps li[aria-current="step"]').waitFor();
  const current = await page.locator('#steps li[aria-current="step"]').textContent();
  if (!/pause until promoted/.test(current)) fail("current step: " + current);
  console.log("canary at 10%, current step: " + current);

  // The candidate's role is shown; ids do not wrap; the past rollout's row
  // says what the header says; configured and observed are apart.
  await page.locator('#versions tr[data-version="2"] td', { hasText: "candidate" }).waitFor({ timeout: 5000 });
  const look = await page.evaluate(() => ({
    wrap: getComputedStyle(document.querySelector("#history td.id")).whiteSpace,
    header: document.getElementById("message").textContent,
    row: document.querySelector('#history tr[data-rollout="r-1"] td.message').textContent,
    configured: document.getElementById("traffic-configured").textContent,
  }));
  if (look.wrap !== "nowrap") fail("rollout ids wrap: " + look.wrap);
  if (look.header !== look.row) fail(`past rollouts lag the header: ${look.row} vs ${look.header}`);
  if (/observed/.test(look.configured)) fail("configured and observed run together: " + look.configured);
  await page.locator("#traffic-observed", { hasText: "observed" }).waitFor({ timeout: 15000 });
  // The same recent requests by protocol (the test's traffic is REST).
  await page.locator('#traffic-protocols [data-protocol="rest"]', { hasText: /^REST [1-9]\d* \(100%\)$/ }).waitFor({ timeout: 15000 });
  if (!(await page.locator("#cluster-note").isHidden())) fail("a single node shows a cluster note");
  console.log("versions, history and split read right");

  // Promote from the page: the split moves to 50 %.
  await page.getByRole("button", { name: /^Promote/ }).click();
  await page.locator('[data-traffic="2"]', { hasText: "2: 50%" }).waitFor({ timeout: 15000 });
  const result = await page.locator("#result").textContent();
  if (!/promote:/.test(result)) fail("promote result: " + result);
  console.log("promoted from the page: " + result);
  // Charts have points once a few polls went by.
  await page.waitForFunction(() => document.querySelectorAll("#chart-rps polyline").length > 0, null, { timeout: 15000 });
  await page.waitForTimeout(2500);
  if (shots) await page.screenshot({ path: shots + "/dashboard.png", fullPage: true });

  // Abort (confirmed): back to stable.
  await page.getByRole("button", { name: /^Abort/ }).click();
  await page.locator("#result.ok", { hasText: "abort:" }).waitFor({ timeout: 10000 });
  await page.locator("#phase", { hasText: "idle" }).waitFor({ timeout: 10000 });
  await page.locator("#history td", { hasText: "aborted" }).first().waitFor({ timeout: 10000 });
  if (shots) await page.screenshot({ path: shots + "/dashboard-aborted.png", fullPage: true });
  console.log("aborted from the page");
  console.log("dashboard OK");
} finally {
  await browser.close();
}
