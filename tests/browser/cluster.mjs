// The dashboard of one instance of a two-instance cluster, in Debian's
// Chromium with playwright-core:
//   node cluster.mjs   (env: FERRY_URL, FERRY_TOKEN, CHROMIUM, SCREENSHOTS)
// Prints each stage it saw; the Rust test freezes the other instance
// (SIGSTOP) after "complete seen" and thaws it after "incomplete seen".
import { launch } from "./launch.mjs";

const url = process.env.FERRY_URL;
const shots = process.env.SCREENSHOTS;
const fail = (msg) => { console.log("FAIL: " + msg); process.exit(1); };

const browser = await launch();
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
  await page.goto(url + "/ui/#model=cancer&token=" + process.env.FERRY_TOKEN);
  const note = page.locator("#cluster-note");
  await page.locator("#cluster-note.muted", { hasText: "Merged over 2 instances." }).waitFor({ timeout: 30000 });
  console.log("complete seen");
  await page.locator("#cluster-note.incomplete").waitFor({ timeout: 30000 });
  const said = await note.textContent();
  if (!/^Incomplete: 1 of 2 instances reported the last seconds \(not yet: [0-9a-f]+\): these figures are short/.test(said)) {
    fail("the incomplete marker says: " + said);
  }
  if (shots) await page.screenshot({ path: shots + "/dashboard-incomplete.png", fullPage: true });
  console.log("incomplete seen: " + said);
  await page.locator("#cluster-note.muted", { hasText: "Merged over 2 instances." }).waitFor({ timeout: 30000 });
  console.log("complete again");
  console.log("dashboard cluster OK");
} catch (e) {
  fail(e.message);
} finally {
  await browser.close();
}
