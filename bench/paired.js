// Paired comparison: one k6 run sends its payments to two stacks in turn (A on
// A_URL, B on B_URL), so both answer under the same machine, at the same moments,
// with the same k6. Driven by bench/paired.py, which starts the two stacks and
// reads the result file.
//
// Load: bench/rinha.js's payment traffic (ramping VUs 1 -> MAX_REQUESTS over 60 s,
// one payment then 1 s of sleep), every other payment to each stack. Processor
// conditions: rinha.js's schedule (SCHEDULE / SCHEDULE_FILE), applied to both
// stacks' simulators at once. No consistency checks: this measures latency only.
//
// Environment: A_URL, B_URL; A_DEFAULT_URL, A_FALLBACK_URL, B_DEFAULT_URL,
// B_FALLBACK_URL (the simulators); TOKEN; MAX_REQUESTS; DURATION_S (60); RESULT_FILE.

import http from 'k6/http';
import { sleep } from 'k6';
import exec from 'k6/execution';
import { Counter, Trend } from 'k6/metrics';
import { loadSchedule } from './rinha.js';

const SIDES = ['A', 'B'];
const URL = { A: __ENV.A_URL, B: __ENV.B_URL };
const SIMULATORS = [__ENV.A_DEFAULT_URL, __ENV.A_FALLBACK_URL, __ENV.B_DEFAULT_URL, __ENV.B_FALLBACK_URL];
const MAX_REQUESTS = parseInt(__ENV.MAX_REQUESTS || '550', 10);
const DURATION_S = parseInt(__ENV.DURATION_S || '60', 10);
const ADMIN_HEADERS = { 'Content-Type': 'application/json', 'X-Rinha-Token': __ENV.TOKEN || '123' };
const SCHEDULE = loadSchedule();

const scenarios = {
  payments: {
    executor: 'ramping-vus', exec: 'payments', startVUs: 1,
    stages: [{ duration: `${DURATION_S}s`, target: MAX_REQUESTS }], gracefulRampDown: '0s', gracefulStop: '3s',
  },
};
SCHEDULE.filter((s) => s.at < DURATION_S).forEach((s, i) => {
  scenarios[`stage_${i}`] = {
    executor: 'shared-iterations', exec: 'applyStage', vus: 1, iterations: 1,
    startTime: `${s.at}s`, maxDuration: '8s', env: { STAGE_INDEX: String(i) },
  };
});
export const options = { scenarios, summaryTrendStats: ['avg', 'med', 'p(90)', 'p(99)', 'max', 'count'] };

const latency = { A: new Trend('pay_A', true), B: new Trend('pay_B', true) };
const failed = { A: new Counter('failed_A'), B: new Counter('failed_B') };

function setConditions(stage) {
  // Each simulator URL list is [default, fallback] per side.
  SIMULATORS.forEach((base, k) => {
    const c = k % 2 === 0 ? stage.default : stage.fallback;
    http.put(`${base}/admin/configurations/delay`, JSON.stringify({ delay: c.delay }), { headers: ADMIN_HEADERS });
    http.put(`${base}/admin/configurations/failure`, JSON.stringify({ failure: c.failure }), { headers: ADMIN_HEADERS });
  });
}

export function setup() {
  for (const side of SIDES) http.post(`${URL[side]}/purge-payments`);
  for (const base of SIMULATORS) http.post(`${base}/admin/purge-payments`, null, { headers: ADMIN_HEADERS });
  setConditions(SCHEDULE[0]);
}

export function applyStage() {
  setConditions(SCHEDULE[parseInt(__ENV.STAGE_INDEX, 10)]);
}

export function payments() {
  const side = SIDES[exec.scenario.iterationInTest % 2];
  const body = JSON.stringify({ correlationId: crypto.randomUUID(), amount: 19.90 });
  const r = http.post(`${URL[side]}/payments`, body, {
    headers: { 'Content-Type': 'application/json' }, timeout: '1.5s', responseType: 'none',
  });
  if (r.status >= 200 && r.status < 300) latency[side].add(r.timings.duration);
  else failed[side].add(1);
  sleep(1);
}

export function handleSummary(data) {
  const out = {};
  for (const side of SIDES) {
    const m = data.metrics[`pay_${side}`];
    const f = data.metrics[`failed_${side}`];
    out[side] = {
      ok: m ? m.values.count : 0, failed: f ? f.values.count : 0,
      mean_ms: m ? m.values.avg : null, p50_ms: m ? m.values.med : null,
      p90_ms: m ? m.values['p(90)'] : null, p99_ms: m ? m.values['p(99)'] : null, max_ms: m ? m.values.max : null,
    };
  }
  return { [__ENV.RESULT_FILE || 'paired-result.json']: JSON.stringify(out, null, 2) };
}
