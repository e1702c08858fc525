"""Domain presets of the synthetic generator: receipts, invoices, medical forms, app screenshots.

Run::

    python -m data.domains --out runs/domains --train 20000 --val 1000 --test 1000 --seed 0 --workers 2
    python -m data.domains --out runs/receipts --domains receipt --train 5000 --val 500 --test 500
    python -m data.domains --grid docs/domain_samples.png          # the README's sample grid

Output: the layout of ``data.generate`` (``DIR/data/{split}-00000-of-00001.parquet``, loaded by
``data.loader.load_split(DIR, split)``) with one more column, ``tags``, a struct of four strings per line::

    {"domain": "receipt", "level": "hard", "degradations": "narrow+faded+blur+noise+jpeg_low", "length": "11-15"}

* ``domain``: ``receipt``, ``invoice``, ``medical`` or ``screenshot`` (:data:`DOMAINS`).
* ``level``: degradation level ``clean``, ``mild``, ``medium`` or ``hard`` (:data:`LEVEL_NAMES`).
* ``degradations``: the operations actually applied, ``+``-joined in a fixed order (:data:`DEGRADATIONS`),
  ``none`` for a line drawn clean.
* ``length``: the label's length bucket in characters (:data:`LENGTH_BUCKETS`).

The recipes (all text comes from templates in this file: no corpus, nothing downloaded):

| domain | text | look |
|---|---|---|
| receipt | shop names, item lines with quantity x price, totals / paid / change, date + time, phone, order and member numbers, cashier lines, closing phrases | thermal print: mono and sans faces, narrow (squeezed 65-90 %), faded and uneven ink (a low-frequency ink mask), low contrast, warm paper |
| invoice | invoice code / number, 18-character tax ids, amounts in figures and in capital numerals (壹佰贰拾元整), tax rate and tax, buyer / seller, bank accounts, dates; full-width and half-width punctuation mixed | scanned paper: serif and sans faces, blue-black or purple ink, scan blur, noise, rotation |
| medical | departments, drug names with specifications and dosages (每日3次，每次2片), lab items with values, units, ranges and ↑/↓ flags, visit / record numbers, patient lines, diagnoses | printed forms and kaiti "doctor's hand" faces, scan degradations |
| screenshot | UI strings (settings, chat, shopping, system), mixed Chinese / Latin / digits, times, sizes, versions | small anti-aliased sans text (12-17 px), light, dark and coloured-button themes, down/up-scaling and JPEG artefacts |

Levels add the scan degradations on top of the domain look: ``clean`` none (JPEG quality 92-95), ``mild``
/ ``medium`` / ``hard`` rotation, blur, noise, down-then-up scaling and JPEG quality ranges like
``data.generate``'s. Training splits draw the domain uniformly and the level with weights 15/40/30/15 %;
:mod:`data.hardset` fixes both per line.

Determinism: line ``i`` of split ``s`` draws from ``numpy.random.default_rng([seed, s, i, 15])``, so the
same seed, sizes and installed fonts give byte-identical parquet files for any ``--workers``.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from data.generate import (
    APT_HINT,
    SPLIT_CODE,
    SPLITS,
    Face,
    _pil_font,
    discover_faces,
    font_files,
    renderer_versions,
    write_generation_json,
)

DOMAINS = ("receipt", "invoice", "medical", "screenshot")
LEVEL_NAMES = ("clean", "mild", "medium", "hard")
TRAIN_LEVEL_WEIGHTS = (0.15, 0.40, 0.30, 0.15)
# Every operation a line can get, in the order it is applied and listed in its tag.
DEGRADATIONS = (
    "narrow", "faded", "low_contrast", "color_ink", "dark_mode", "button", "small_font",
    "rotate", "downscale", "upscale", "blur", "noise", "jpeg_low",
)
# (lo, hi, name): label length in characters, inclusive bounds.
LENGTH_BUCKETS = ((1, 5, "1-5"), (6, 10, "6-10"), (11, 15, "11-15"), (16, 20, "16-20"), (21, 10**6, "21+"))
TAG_KEYS = ("domain", "level", "degradations", "length")
SALT = 15  # last element of each line's seed: the domain generator never shares a stream with data.generate
ROW_GROUP = 1000

# Scan degradations per level: (max rotation deg, blur radius, noise sigma, JPEG quality, scale factor or None).
LEVEL_PARAMS = {
    "clean": (0.0, None, None, (92, 95), None),
    "mild": (1.0, (0.3, 0.7), (3, 8), (65, 92), None),
    "medium": (1.8, (0.5, 1.0), (6, 14), (45, 75), (0.65, 0.85)),
    "hard": (2.5, (0.8, 1.3), (12, 22), (25, 50), (0.45, 0.65)),
}
JPEG_LOW = 60  # quality at or below which a line is tagged jpeg_low

# Faces per domain, by file name (a domain uses those installed; at least one must be).
DOMAIN_FACES = {
    "receipt": ("LXGWWenKaiMono-Regular.ttf", "wqy-microhei.ttc", "wqy-zenhei.ttc", "NotoSansCJK-Regular.ttc",
                "NotoSansCJKsc-Regular.otf"),
    "invoice": ("NotoSerifCJK-Regular.ttc", "NotoSansCJK-Regular.ttc", "uming.ttc", "NotoSerifCJKsc-Regular.otf",
                "NotoSansCJKsc-Regular.otf", "wqy-zenhei.ttc"),
    "medical": ("NotoSansCJK-Regular.ttc", "NotoSerifCJK-Regular.ttc", "ukai.ttc", "LXGWWenKai-Regular.ttf",
                "wqy-microhei.ttc", "NotoSansCJKsc-Regular.otf"),
    "screenshot": ("NotoSansCJK-Regular.ttc", "NotoSansCJK-Bold.ttc", "wqy-microhei.ttc",
                   "NotoSansCJKsc-Regular.otf"),
}


def length_bucket(text: str) -> str:
    """The :data:`LENGTH_BUCKETS` name of a label's length (``"1-5"`` ... ``"21+"``)."""
    n = len(text)
    for lo, hi, name in LENGTH_BUCKETS:
        if lo <= n <= hi:
            return name
    return "0"


# --------------------------------------------------------------------------------------------- amounts
_DIGITS_UPPER = "零壹贰叁肆伍陆柒捌玖"


def _group_upper(n: int) -> str:
    """0 < n < 10000 in capital numerals, inner zeros collapsed (1005 -> 壹仟零伍)."""
    out, zero = [], False
    for digit, unit in zip(f"{n:04d}", ("仟", "佰", "拾", "")):
        d = int(digit)
        if d == 0:
            zero = bool(out)  # a zero matters only after a non-zero digit
            continue
        if zero:
            out.append("零")
            zero = False
        out.append(_DIGITS_UPPER[d] + unit)
    return "".join(out)


def rmb_upper(cents: int) -> str:
    """An amount in fen in capital numerals, as on Chinese invoices (the 大写 field).

    ``rmb_upper(12000)`` is 壹佰贰拾元整, ``rmb_upper(100530)`` 壹仟零伍元叁角, ``rmb_upper(10020005)``
    壹拾万零贰佰元零伍分: a leading ten is written 壹拾 (the invoice convention), a gap of zeros inside the
    number is one 零, and an amount with no 角 and 分 ends in 整.

    Args:
        cents: The amount in fen (0 <= cents < 10**14).

    Returns:
        The capital-numeral string.

    Raises:
        ValueError: A negative or too large amount.
    """
    if not 0 <= cents < 10**14:
        raise ValueError(f"amount {cents!r} fen is outside 0 .. 10**14-1")
    yuan, rest = divmod(cents, 100)
    jiao, fen = divmod(rest, 10)
    parts, pending_zero = [], False
    groups = [(yuan // 10**8) % 10**4, (yuan // 10**4) % 10**4, yuan % 10**4]
    for g, unit in zip(groups, ("亿", "万", "")):
        if g == 0:
            pending_zero = bool(parts)
            continue
        if parts and (pending_zero or g < 1000):
            parts.append("零")  # 100200 -> 壹拾万零贰佰: a gap inside the number is read as one zero
        parts.append(_group_upper(g) + unit)
        pending_zero = False
    out = "".join(parts)
    if yuan:
        out += "元"
    if not rest:
        return (out or "零元") + "整"
    if jiao:
        out += _DIGITS_UPPER[jiao] + "角"
    elif yuan:
        out += "零"
    if fen:
        out += _DIGITS_UPPER[fen] + "分"
    return out


# --------------------------------------------------------------------------------------------- text
SURNAMES = "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘于蒋蔡余杜叶程苏魏吕丁任沈"
GIVEN = "伟芳娜敏静丽强磊军洋勇艳杰娟涛明超秀霞平刚桂英华玉兰萍红建国文辉鹏宇浩然欣怡子涵梓轩"
SHOP_BRANDS = ("华联", "永辉", "联华", "家乐福", "物美", "大润发", "盒马", "美宜佳", "便利蜂", "罗森", "全家", "苏果",
               "世纪联华", "好又多", "天虹", "步步高", "红旗", "京客隆")
SHOP_KINDS = ("超市", "便利店", "生鲜店", "烘焙坊", "药房", "餐厅", "奶茶店", "水果店", "面馆", "咖啡馆", "百货")
BRANCHES = ("人民路店", "中山路店", "解放路店", "建设路店", "和平店", "长江路店", "新华店", "东风店", "科技园店",
            "万达店", "火车站店", "大学城店")
GOODS = ("矿泉水550ml", "纯牛奶250ml", "全麦面包", "鸡蛋10枚", "红富士苹果", "洗衣液2kg", "抽纸3包", "东北大米5kg",
         "花生油1.8L", "原味酸奶", "美式咖啡", "拿铁大杯", "珍珠奶茶", "可口可乐330ml", "薯片70g", "方便面",
         "香蕉", "西红柿", "土豆", "五花肉", "鸡胸肉", "三文鱼", "酱油500ml", "食盐", "白砂糖", "牙膏120g",
         "洗发水", "卷纸10卷", "保鲜袋", "电池AA", "口罩", "冰淇淋", "巧克力", "饼干", "绿茶", "橙汁1L")
UNITS = ("个", "件", "袋", "瓶", "盒", "kg", "斤", "包", "杯")
PAYMENTS = ("微信支付", "支付宝", "现金", "银联卡", "云闪付", "会员储值")
CLOSING = ("谢谢惠顾，欢迎再次光临", "请妥善保管小票", "凭小票七日内可退换", "欢迎光临", "关注公众号领优惠券",
           "本小票不作报销凭证", "多谢惠顾!", "如需发票请扫码开具")
COMPANY_PLACES = ("北京", "上海", "深圳", "广州", "杭州", "南京", "成都", "武汉", "苏州", "天津", "重庆", "西安")
COMPANY_WORDS = ("华信", "中科", "恒达", "鑫源", "东方", "远航", "星辰", "创新", "宏图", "金桥", "万通", "博远", "瑞丰",
                 "佳禾", "天成", "汇通")
COMPANY_KINDS = ("科技有限公司", "贸易有限公司", "信息技术有限公司", "商贸有限公司", "实业有限公司",
                 "网络科技有限公司", "餐饮管理有限公司", "医药有限公司", "建筑工程有限公司")
SERVICES = ("*信息技术服务*软件开发费", "*现代服务*咨询服务费", "*餐饮服务*餐费", "*办公用品*打印纸",
            "*计算机配套产品*显示器", "*运输服务*国内道路货物运输", "*住宿服务*住宿费", "*电信服务*通讯费",
            "*劳务*技术服务费", "*医疗仪器器械*血压计")
BANKS = ("中国工商银行", "中国建设银行", "中国农业银行", "中国银行", "招商银行", "交通银行", "浦发银行", "中信银行")
DEPARTMENTS = ("内科", "外科", "心血管内科", "呼吸内科", "消化内科", "神经内科", "内分泌科", "肾内科", "普外科",
               "骨科", "泌尿外科", "妇产科", "儿科", "眼科", "耳鼻喉科", "口腔科", "皮肤科", "急诊科", "中医科",
               "康复医学科", "检验科", "放射科", "超声科", "感染科", "肿瘤科")
DRUGS = (("阿莫西林胶囊", "0.25g×24粒", "粒"), ("布洛芬缓释胶囊", "0.3g×20粒", "粒"), ("头孢克肟片", "0.1g×6片", "片"),
         ("盐酸二甲双胍片", "0.5g×48片", "片"), ("阿司匹林肠溶片", "100mg×30片", "片"),
         ("奥美拉唑肠溶胶囊", "20mg×14粒", "粒"), ("氯雷他定片", "10mg×6片", "片"), ("蒙脱石散", "3g×10袋", "袋"),
         ("复方甘草片", "100片", "片"), ("硝苯地平控释片", "30mg×7片", "片"), ("阿托伐他汀钙片", "20mg×7片", "片"),
         ("左氧氟沙星片", "0.5g×4片", "片"), ("对乙酰氨基酚片", "0.5g×12片", "片"), ("连花清瘟胶囊", "0.35g×24粒", "粒"),
         ("维生素C片", "0.1g×100片", "片"), ("盐酸氨溴索口服溶液", "100ml", "ml"), ("甲硝唑片", "0.2g×21片", "片"),
         ("苯磺酸氨氯地平片", "5mg×28片", "片"), ("孟鲁司特钠片", "10mg×5片", "片"), ("双氯芬酸钠缓释片", "75mg×10片", "片"))
FREQS = ("每日3次", "每日2次", "每日1次", "一日三次", "一日两次", "每晚1次", "每8小时1次", "必要时")
ROUTES = ("口服", "饭后口服", "饭前口服", "睡前口服", "温水送服", "外用", "含服")
# (name, abbreviation, unit, low, high, decimals)
LAB_ITEMS = (("白细胞计数", "WBC", "×10^9/L", 3.5, 9.5, 2), ("红细胞计数", "RBC", "×10^12/L", 4.3, 5.8, 2),
             ("血红蛋白", "HGB", "g/L", 130, 175, 0), ("血小板计数", "PLT", "×10^9/L", 125, 350, 0),
             ("中性粒细胞百分比", "NEUT%", "%", 40, 75, 1), ("谷丙转氨酶", "ALT", "U/L", 9, 50, 0),
             ("谷草转氨酶", "AST", "U/L", 15, 40, 0), ("总胆红素", "TBIL", "μmol/L", 3.4, 20.5, 1),
             ("空腹血糖", "GLU", "mmol/L", 3.9, 6.1, 2), ("总胆固醇", "TC", "mmol/L", 2.8, 5.2, 2),
             ("甘油三酯", "TG", "mmol/L", 0.56, 1.7, 2), ("肌酐", "CREA", "μmol/L", 57, 111, 0),
             ("尿酸", "UA", "μmol/L", 208, 428, 0), ("C反应蛋白", "CRP", "mg/L", 0, 10, 1),
             ("糖化血红蛋白", "HbA1c", "%", 4.0, 6.0, 1), ("钾", "K", "mmol/L", 3.5, 5.3, 2))
DIAGNOSES = ("上呼吸道感染", "急性支气管炎", "高血压病", "2型糖尿病", "慢性胃炎", "腰椎间盘突出症", "过敏性鼻炎",
             "急性肠胃炎", "高脂血症", "冠心病", "失眠", "湿疹", "社区获得性肺炎", "缺铁性贫血", "颈椎病")
MED_FIELDS = ("门诊号", "住院号", "病历号", "就诊卡号", "医保卡号", "床号", "检验单号", "处方号")
UI_WORDS = ("设置", "通用", "关于本机", "蓝牙", "无线局域网", "移动数据", "通知", "隐私", "电池", "显示与亮度",
            "存储空间", "软件更新", "登录", "注册", "忘记密码?", "确定", "取消", "发送", "返回", "完成", "编辑",
            "搜索", "分享", "收藏", "删除", "复制链接", "转发", "已读", "撤回", "消息免打扰", "置顶聊天", "清空聊天记录",
            "购物车", "待付款", "待发货", "待收货", "查看物流", "申请售后", "立即购买", "加入购物车", "领券", "首页",
            "我的", "发现", "通讯录", "朋友圈", "扫一扫", "小程序", "视频号", "直播", "关注", "粉丝", "点赞", "评论")
UI_LATIN = ("Wi-Fi", "5G", "4G", "LTE", "VPN", "App", "iOS", "Android", "HarmonyOS", "GitHub", "Python", "HTTP",
            "API", "CPU", "GPU", "USB-C", "NFC", "ID", "QQ", "WLAN", "OK", "PDF", "Excel", "Word", "APP", "SIM")


def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def _colon(rng: np.random.Generator, fullwidth: float = 0.6) -> str:
    return "：" if rng.random() < fullwidth else ":"


def _name(rng: np.random.Generator) -> str:
    given = "".join(_pick(rng, GIVEN) for _ in range(int(rng.integers(1, 3))))
    return _pick(rng, SURNAMES) + (given if rng.random() < 0.6 else "*" * len(given))


def _date(rng: np.random.Generator, style: int | None = None) -> str:
    y, m, d = int(rng.integers(2015, 2027)), int(rng.integers(1, 13)), int(rng.integers(1, 29))
    style = int(rng.integers(4)) if style is None else style
    return (f"{y}-{m:02d}-{d:02d}", f"{y}/{m:02d}/{d:02d}", f"{y}年{m:02d}月{d:02d}日", f"{y}.{m}.{d}")[style]


def _time(rng: np.random.Generator, seconds: bool = True) -> str:
    h, mi, s = int(rng.integers(0, 24)), int(rng.integers(0, 60)), int(rng.integers(0, 60))
    return f"{h:02d}:{mi:02d}:{s:02d}" if seconds else f"{h:02d}:{mi:02d}"


def _money(rng: np.random.Generator, lo: int = 1, hi: int = 500) -> tuple[int, str]:
    cents = int(rng.integers(lo * 100, hi * 100))
    if rng.random() < 0.3:
        cents -= cents % 10
    return cents, f"{cents // 100}.{cents % 100:02d}"


def _phone(rng: np.random.Generator) -> str:
    if rng.random() < 0.4:
        area = _pick(rng, ("010", "021", "020", "0755", "0571", "025", "028", "027"))
        return f"{area}-{int(rng.integers(10**7, 10**8))}"
    digits = f"1{int(rng.integers(3, 10))}{int(rng.integers(0, 10**9)):09d}"
    return digits[:3] + "****" + digits[7:] if rng.random() < 0.3 else digits


def receipt_line(rng: np.random.Generator) -> str:
    """One line of a shop receipt (shop, item, total, payment, date, numbers, closing phrase)."""
    c = _colon(rng, 0.5)
    yen = _pick(rng, ("¥", "￥", ""))
    cents, price = _money(rng, 1, 120)
    qty = int(rng.integers(1, 10))
    _, total = _money(rng, 5, 2000)
    kind = int(rng.integers(14))
    if kind == 0:
        return _pick(rng, SHOP_BRANDS) + _pick(rng, SHOP_KINDS) + (f"({_pick(rng, BRANCHES)})" if rng.random() < 0.6 else "")
    if kind in (1, 2, 3):
        item = _pick(rng, GOODS)
        forms = (f"{item}{qty}x{price}", f"{item}{qty}{_pick(rng, UNITS)}{yen}{price}",
                 f"{item}x{qty}{yen}{(cents * qty) // 100}.{(cents * qty) % 100:02d}", f"{item}{price}")
        return _pick(rng, forms)
    if kind == 4:
        return f"数量{c}{qty}单价{c}{price}金额{c}{(cents * qty) // 100}.{(cents * qty) % 100:02d}"
    if kind == 5:
        return f"{_pick(rng, ('合计', '总计', '应收', '实收', '应付'))}{c}{yen}{total}"
    if kind == 6:
        return f"{_pick(rng, ('找零', '优惠', '会员折扣', '抹零'))}{c}{price}"
    if kind == 7:
        return f"{_pick(rng, ('支付方式', '付款方式'))}{c}{_pick(rng, PAYMENTS)}"
    if kind == 8:
        if rng.random() < 0.5:
            return f"{_pick(rng, ('交易时间', '时间', '打印时间'))}{c}{_time(rng)}"
        return f"{_pick(rng, ('交易日期', '日期'))}{c}{_date(rng, int(rng.integers(3)))}"
    if kind == 9:
        return f"{_pick(rng, ('电话', '客服电话', 'TEL'))}{c}{_phone(rng)}"
    if kind == 10:
        return f"{_pick(rng, ('单号', '订单号', '流水号', 'NO.'))}{c}{int(rng.integers(10**9, 10**12))}"
    if kind == 11:
        return f"收银员{c}{int(rng.integers(1, 100)):02d}机号{c}{int(rng.integers(1, 20)):02d}"
    if kind == 12:
        return f"会员卡号{c}{int(rng.integers(1000, 9999))}****{int(rng.integers(1000, 9999))}"
    return _pick(rng, CLOSING)


def _tax_id(rng: np.random.Generator) -> str:
    # Unified social credit code shape: 91 + 6-digit region + 10 alphanumerics (no I, O, S, V, Z).
    alnum = "0123456789ABCDEFGHJKLMNPQRTUWXY"
    return "91" + f"{int(rng.integers(110000, 660000))}" + "".join(_pick(rng, alnum) for _ in range(10))


def invoice_line(rng: np.random.Generator) -> str:
    """One line of a VAT invoice or bill (codes, tax ids, amounts in figures and capital numerals)."""
    c = _colon(rng, 0.55)
    lp, rp = ("（", "）") if rng.random() < 0.5 else ("(", ")")
    comma = "，" if rng.random() < 0.5 else ","
    cents, fig = _money(rng, 1, 100000)
    yen = _pick(rng, ("¥", "￥"))
    company = _pick(rng, COMPANY_PLACES) + _pick(rng, COMPANY_WORDS) + _pick(rng, COMPANY_KINDS)
    kind = int(rng.integers(12))
    if kind == 0:
        return f"发票代码{c}{int(rng.integers(10**11, 10**12))}"
    if kind == 1:
        return f"发票号码{c}{int(rng.integers(0, 10**8)):08d}"
    if kind == 2:
        return f"{_pick(rng, ('纳税人识别号', '统一社会信用代码', '税号'))}{c}{_tax_id(rng)}"
    if kind in (3, 4):
        return f"价税合计{lp}大写{rp}{rmb_upper(cents)}" if kind == 3 else f"{lp}小写{rp}{yen}{fig}"
    if kind == 5:
        return f"{rmb_upper(cents)}"
    if kind == 6:
        rate = _pick(rng, (1, 3, 6, 9, 13))
        tax = cents * rate // 100
        return f"税率{c}{rate}%{comma}税额{c}{tax // 100}.{tax % 100:02d}"
    if kind == 7:
        return f"{_pick(rng, ('购买方名称', '销售方名称', '名称', '购方', '销方'))}{c}{company}"
    if kind == 8:
        acct = "".join(str(int(rng.integers(10))) for _ in range(int(rng.integers(16, 20))))
        return f"{_pick(rng, BANKS)}{_pick(rng, COMPANY_PLACES)}分行{acct}"
    if kind == 9:
        return f"开票日期{c}{_date(rng, 2)}"
    if kind == 10:
        return f"{_pick(rng, SERVICES)}{comma}{_pick(rng, ('金额', '单价'))}{fig}"
    return f"{_pick(rng, ('开票人', '复核', '收款人'))}{c}{_name(rng)}{comma}{_pick(rng, ('备注', '校验码'))}{c}{int(rng.integers(10**5, 10**6))}"


def medical_line(rng: np.random.Generator) -> str:
    """One line of a prescription, lab report or medical record."""
    c = _colon(rng, 0.7)
    comma = "，" if rng.random() < 0.7 else ","
    kind = int(rng.integers(10))
    if kind == 0:
        return f"{_pick(rng, ('科室', '就诊科室', '科别'))}{c}{_pick(rng, DEPARTMENTS)}"
    if kind in (1, 2):
        drug, spec, unit = _pick(rng, DRUGS)
        if kind == 1:
            return f"{drug}{spec}{'x' if rng.random() < 0.5 else '×'}{int(rng.integers(1, 6))}{_pick(rng, ('盒', '瓶', '袋'))}"
        dose = f"{int(rng.integers(1, 4))}{unit}" if unit != "ml" else f"{int(rng.integers(5, 21))}ml"
        forms = (f"{_pick(rng, FREQS)}{comma}每次{dose}", f"{_pick(rng, ROUTES)}{comma}{_pick(rng, FREQS)}{comma}每次{dose}",
                 f"用法{c}{_pick(rng, ROUTES)}{_pick(rng, FREQS)}")
        return _pick(rng, forms)
    if kind in (3, 4):
        name, abbr, unit, lo, hi, dec = _pick(rng, LAB_ITEMS)
        u = rng.random()
        value = rng.uniform(lo * 0.6, lo) if u < 0.2 else (rng.uniform(hi, hi * 1.5) if u < 0.4 else rng.uniform(lo, hi))
        flag = "↓" if value < lo else ("↑" if value > hi else "")
        val = f"{value:.{dec}f}"
        rng_txt = f"{lo:.{dec}f}-{hi:.{dec}f}"
        forms = (f"{name}{val}{flag}{unit}", f"{abbr}{val}{flag}{unit}", f"{name}{lp_rp(rng, abbr)}{val}{flag}",
                 f"{abbr}{val}{unit}{lp_rp(rng, rng_txt)}")
        return _pick(rng, forms)
    if kind == 5:
        return f"{_pick(rng, MED_FIELDS)}{c}{_pick(rng, ('MZ', 'ZY', ''))}{int(rng.integers(10**6, 10**10))}"
    if kind == 6:
        return f"姓名{c}{_name(rng)}{comma}性别{c}{_pick(rng, ('男', '女'))}{comma}年龄{c}{int(rng.integers(1, 95))}岁"
    if kind == 7:
        return f"{_pick(rng, ('诊断', '初步诊断', '临床诊断'))}{c}{_pick(rng, DIAGNOSES)}"
    if kind == 8:
        return f"{_pick(rng, ('就诊日期', '报告日期', '采样时间', '开具日期'))}{c}{_date(rng, int(rng.integers(3)))}"
    return f"{_pick(rng, ('医师', '主治医师', '检验者', '审核者'))}{c}{_name(rng)}"


def lp_rp(rng: np.random.Generator, inner: str) -> str:
    """``inner`` in full-width or half-width parentheses."""
    return f"（{inner}）" if rng.random() < 0.5 else f"({inner})"


def screenshot_line(rng: np.random.Generator) -> str:
    """One UI string of an app or system screenshot: Chinese, Latin and digits mixed."""
    kind = int(rng.integers(10))
    if kind in (0, 1):
        return _pick(rng, UI_WORDS)
    if kind == 2:
        return f"{_pick(rng, UI_WORDS)}({int(rng.integers(1, 100))})"
    if kind == 3:
        return f"{_pick(rng, ('上午', '下午', '昨天', '周三'))}{int(rng.integers(1, 13))}:{int(rng.integers(0, 60)):02d}"
    if kind == 4:
        a = rng.uniform(1, 900)
        return f"{_pick(rng, ('下载中', '已下载', '清除缓存', '可用空间'))}{a:.1f}{_pick(rng, ('MB', 'GB', 'KB'))}"
    if kind == 5:
        return f"{_pick(rng, UI_LATIN)}{_pick(rng, ('已连接', '已关闭', '未连接', '设置', '版本', '登录'))}"
    if kind == 6:
        return f"{_pick(rng, ('版本', 'Version', '当前版本'))}V{int(rng.integers(1, 20))}.{int(rng.integers(0, 10))}.{int(rng.integers(0, 30))}"
    if kind == 7:
        return f"验证码已发送至{_phone(rng)}"
    if kind == 8:
        n = rng.uniform(1, 99)
        return f"{_pick(rng, ('点赞', '评论', '播放', '粉丝', '浏览'))}{n:.1f}{_pick(rng, ('万', 'w', 'k', '亿'))}"
    return f"{_pick(rng, ('电池', '电量', 'CPU使用率', '信号强度', '进度'))}{int(rng.integers(1, 101))}%"


TEXT = {"receipt": receipt_line, "invoice": invoice_line, "medical": medical_line, "screenshot": screenshot_line}
MAX_CHARS = 32  # longer template draws are redrawn: one line, about the width a line model reads


# --------------------------------------------------------------------------------------------- render
@dataclass(frozen=True)
class Line:
    """One generated line: JPEG bytes, label, face name and tags."""

    image: bytes
    text: str
    face: str
    tags: dict[str, str]


class DomainGenerator:
    """Text, face, rendering and degradation for the domain presets; built once per process.

    Args:
        domains: The domains a split mixes (uniformly), default all of :data:`DOMAINS`.
    """

    def __init__(self, domains: tuple[str, ...] = DOMAINS):
        """Discover the faces of each domain."""
        unknown = [d for d in domains if d not in DOMAINS]
        if unknown or not domains:
            raise ValueError(f"domains {list(domains)!r}: each must be one of {', '.join(DOMAINS)} (at least one).")
        self.domains = tuple(domains)
        faces = discover_faces("reference")
        self.faces: dict[str, tuple[Face, ...]] = {}
        for d in self.domains:
            wanted = DOMAIN_FACES[d]
            chosen = tuple(f for f in faces if f.name.split("#")[0] in wanted)  # Face.name is "file#index"
            if not chosen:
                raise RuntimeError(f"no face of domain {d!r} installed (wanted one of {', '.join(wanted)}): {APT_HINT}")
            self.faces[d] = chosen
        self._cover: dict[tuple[str, str], int] = {}

    def _faces_covering(self, domain: str, text: str) -> list[Face]:
        faces = self.faces[domain]
        mask = (1 << len(faces)) - 1
        for ch in text:
            m = self._cover.get((domain, ch))
            if m is None:
                m = sum(1 << k for k, f in enumerate(faces) if ord(ch) in f.cmap)
                self._cover[(domain, ch)] = m
            mask &= m
        return [f for k, f in enumerate(faces) if mask >> k & 1]

    def pick(self, rng: np.random.Generator, domain: str) -> tuple[str, Face]:
        """A label of ``domain`` (1..MAX_CHARS characters) and a face that draws all of it."""
        for _ in range(100):
            text = TEXT[domain](rng)
            if not 1 <= len(text) <= MAX_CHARS:
                continue
            ok = self._faces_covering(domain, text)
            if ok:
                return text, ok[int(rng.integers(len(ok)))]
        raise RuntimeError(f"100 {domain} lines in a row had a character no installed face covers: {APT_HINT}")

    # ---------------------------------------------------------------- the domain look
    def _look(self, domain: str, level: str, rng: np.random.Generator, applied: list[str]):
        """Height, font-size factor, paper and ink colours, squeeze factor for a domain."""
        strength = LEVEL_NAMES.index(level)  # 0 clean .. 3 hard: how strong the domain look is drawn
        squeeze, fade = 1.0, 0.0
        if domain == "screenshot":
            height = int(rng.integers(16, 26))
            size_f = rng.uniform(0.62, 0.75)
            if height <= 20:
                applied.append("small_font")
            theme = rng.random()
            if theme < 0.55:
                bg, ink = (255, 255, 255), tuple(int(x) for x in rng.integers(0, 70, 3))
            elif theme < 0.8:
                applied.append("dark_mode")
                g = int(rng.integers(0, 40))
                bg, ink = (g, g, g + int(rng.integers(0, 12))), tuple(int(x) for x in rng.integers(200, 256, 3))
            else:
                applied.append("button")
                bg = _pick(rng, ((7, 193, 96), (24, 144, 255), (250, 81, 81), (255, 149, 0), (87, 107, 149)))
                ink = (255, 255, 255)
            return height, size_f, bg, ink, squeeze, fade
        height = int(rng.integers(24, 41))
        size_f = rng.uniform(0.62, 0.82)
        base = int(rng.integers(200, 256))
        bg = tuple(int(np.clip(base + rng.integers(-10, 11), 0, 255)) for _ in range(3))
        ink = tuple(int(x) for x in np.clip(int(rng.integers(0, 70)) + rng.integers(-12, 13, 3), 0, 255))
        if domain == "receipt":
            bg = (bg[0], bg[1], max(0, bg[2] - int(rng.integers(0, 20))))  # thermal paper is warm
            if rng.random() < 0.5 + 0.15 * strength:
                squeeze = float(rng.uniform(0.65, 0.9))
                applied.append("narrow")
            # Faded and grey ink stay readable: coverage never drops below 40 %, grey ink stays <= 130.
            if strength and rng.random() < 0.3 + 0.2 * strength:
                fade = float(rng.uniform(0.1, 0.2 + 0.08 * strength))
                applied.append("faded")
            if strength and rng.random() < 0.2 + 0.2 * strength:
                grey = int(rng.integers(80, 100 + 10 * strength))
                ink = (grey, grey, grey)
                applied.append("low_contrast")
        elif domain == "invoice" and rng.random() < 0.5:
            ink = _pick(rng, ((20, 30, 110), (60, 30, 110), (30, 30, 60), (110, 20, 40)))
            applied.append("color_ink")
        elif domain == "medical" and strength >= 2 and rng.random() < 0.4:
            fade = float(rng.uniform(0.1, 0.35))
            applied.append("faded")
        return height, size_f, bg, ink, squeeze, fade

    def render(self, text: str, face: Face, domain: str, level: str, rng: np.random.Generator) -> tuple[bytes, list[str]]:
        """Draw one line with the domain look and the level's degradations; return (JPEG bytes, applied ops).

        The text is drawn as an 8-bit coverage mask and every geometric and optical operation (squeeze,
        rotation, down/up-scaling, blur) runs on that one channel; ink and paper colours are mixed in
        afterwards, then sensor noise and JPEG. Same look as degrading the RGB image, a third of the cost.
        """
        applied: list[str] = []
        height, size_f, bg, ink, squeeze, fade = self._look(domain, level, rng, applied)
        size = max(9, round(height * size_f))
        font = _pil_font(face.path, face.index, size)
        left, top, right, bottom = font.getbbox(text)
        tw, th = max(1, right - left), max(1, bottom - top)
        h = max(height, th + 2)
        pad_l, pad_r = int(rng.integers(1, h // 2 + 2)), int(rng.integers(1, h // 2 + 2))
        w = tw + pad_l + pad_r
        mask = Image.new("L", (w, h), 0)
        ImageDraw.Draw(mask).text((pad_l - left, (h - th) // 2 - top + int(rng.integers(-1, 2))), text, font=font, fill=255)
        if squeeze < 1.0:
            mask = mask.resize((max(2, round(w * squeeze)), h), Image.BILINEAR)
        rot, blur, noise, qual, scale = LEVEL_PARAMS[level]
        if rot and domain != "screenshot" and rng.random() < 0.6:
            mask = mask.rotate(float(rng.uniform(-rot, rot)), resample=Image.BILINEAR, expand=True, fillcolor=0)
            applied.append("rotate")
        if scale is not None and rng.random() < 0.7:
            # Down then up: the blocky softness of a low-resolution scan or a shrunk screenshot.
            mw, mh = mask.size
            f = rng.uniform(*scale)
            mask = mask.resize((max(2, round(mw * f)), max(2, round(mh * f))), Image.BILINEAR).resize((mw, mh), Image.BICUBIC)
            applied.append("downscale")
        if domain == "screenshot" and level != "clean" and rng.random() < 0.35:
            # Messaging apps and viewers enlarge small screenshots: soft, blocky edges.
            f = float(rng.uniform(1.3, 2.0))
            mask = mask.resize((round(mask.width * f), round(mask.height * f)), Image.BILINEAR)
            applied.append("upscale")
        if blur is not None and domain != "screenshot" and rng.random() < 0.7:
            mask = mask.filter(ImageFilter.GaussianBlur(float(rng.uniform(*blur))))
            applied.append("blur")
        a = np.asarray(mask, dtype=np.float32) * (1.0 / 255.0)
        if fade > 0:
            # Uneven thermal ink: a low-frequency random field along the line (and a little across it).
            cols = max(2, a.shape[1] // 12)
            field = Image.fromarray((rng.random((2, cols)) * 255).astype(np.uint8), "L")
            field = np.asarray(field.resize((a.shape[1], a.shape[0]), Image.BILINEAR), dtype=np.float32) / 255.0
            a = a * (1.0 - fade * 1.6 * field).clip(0.4, 1.0)
        bg_a, ink_a = np.asarray(bg, dtype=np.float32), np.asarray(ink, dtype=np.float32)
        pix = bg_a + a[..., None] * (ink_a - bg_a)
        if noise is not None and domain != "screenshot" and rng.random() < 0.8:
            pix += rng.normal(0.0, rng.uniform(*noise), size=(a.shape[0], a.shape[1], 1)).astype(np.float32)
            applied.append("noise")
        im = Image.fromarray(pix.round().clip(0, 255).astype(np.uint8), "RGB")
        q = int(rng.integers(qual[0], qual[1] + 1))
        if domain == "screenshot" and level != "clean":
            q = max(15, q - 15)  # screenshots are re-compressed by every app they pass through
        if q <= JPEG_LOW:
            applied.append("jpeg_low")
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=q)
        return buf.getvalue(), applied

    def make(self, seed: int, split: str, index: int, *, domain: str | None = None, level: str | None = None) -> Line:
        """Line ``index`` of ``split``: deterministic in (seed, split, index, domain, level).

        Args:
            seed: Base seed.
            split: ``train``, ``val`` or ``test``.
            index: Line index.
            domain: Fix the domain; default drawn uniformly from the generator's domains.
            level: Fix the level; default drawn with :data:`TRAIN_LEVEL_WEIGHTS`.
        """
        rng = np.random.default_rng([seed, SPLIT_CODE[split], index, SALT])
        domain = domain or self.domains[int(rng.integers(len(self.domains)))]
        level = level or LEVEL_NAMES[int(np.searchsorted(np.cumsum(TRAIN_LEVEL_WEIGHTS), rng.random(), side="right"))]
        text, face = self.pick(rng, domain)
        image, applied = self.render(text, face, domain, level, rng)
        ops = "+".join(d for d in DEGRADATIONS if d in applied) or "none"
        tags = {"domain": domain, "level": level, "degradations": ops, "length": length_bucket(text)}
        return Line(image, text, face.name, tags)


# --------------------------------------------------------------------------------------------- writing
def features(with_id: bool = False):
    """``datasets.Features`` of a tagged split: (``id``,) image, text and the ``tags`` struct."""
    import datasets

    cols = {"id": datasets.Value("string")} if with_id else {}
    return datasets.Features({**cols, "image": datasets.Image(), "text": datasets.Value("string"),
                              "tags": {k: datasets.Value("string") for k in TAG_KEYS}})


def write_parquet(path: str, lines: list[Line], ids: list[str] | None = None) -> None:
    """Write lines to one parquet file with the :func:`features` schema (row groups of 1,000).

    Args:
        path: The parquet file.
        lines: The lines, in order.
        ids: Optional record ids (an ``id`` column, which ``data.loader`` uses instead of ``split-index``).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if ids is not None and len(ids) != len(lines):
        raise ValueError(f"{len(ids)} ids for {len(lines)} lines")
    schema = features(with_id=ids is not None).arrow_schema
    with pq.ParquetWriter(path, schema) as writer:
        for s in range(0, len(lines), ROW_GROUP):
            rows = lines[s : s + ROW_GROUP]
            images = pa.array([{"bytes": r.image, "path": None} for r in rows], type=schema.field("image").type)
            texts = pa.array([r.text for r in rows], type=pa.string())
            tags = pa.array([{k: r.tags[k] for k in TAG_KEYS} for r in rows], type=schema.field("tags").type)
            cols = [images, texts, tags] if ids is None else [pa.array(ids[s : s + ROW_GROUP], pa.string()), images, texts, tags]
            writer.write_table(pa.Table.from_arrays(cols, schema=schema))


_WORKER: DomainGenerator | None = None


def _init_worker(domains: tuple[str, ...]) -> None:
    global _WORKER
    if _WORKER is None or _WORKER.domains != domains:
        _WORKER = DomainGenerator(domains)


def _make_chunk(args: tuple[int, str, int, int]) -> list[Line]:
    seed, split, start, stop = args
    assert _WORKER is not None
    return [_WORKER.make(seed, split, i) for i in range(start, stop)]


def generate_domains(out: str, sizes: dict[str, int], *, seed: int = 0, domains: tuple[str, ...] = DOMAINS,
                     workers: int = 1) -> dict:
    """Write a tagged synthetic dataset of the given domains; return the summary (``out/generation.json``).

    Args:
        out: Output folder; parquet files go to ``out/data/``.
        sizes: Lines per split, e.g. ``{"train": 1000, "val": 100}``.
        seed: Base seed.
        domains: Domains to mix (uniformly).
        workers: Processes; the output does not depend on it.

    Returns:
        Sizes, fonts, renderer versions, seconds, lines/s, and the count of lines per tag value.
    """
    bad = [s for s in sizes if s not in SPLITS]
    if bad or any(n < 0 for n in sizes.values()):
        raise ValueError(f"sizes must map {SPLITS} to counts >= 0, got {sizes}.")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}.")
    domains = tuple(domains)
    _init_worker(domains)
    features()  # imports datasets (~2 s) before the clock starts: lines_per_s is rendering and writing
    os.makedirs(os.path.join(out, "data"), exist_ok=True)
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    pool = ctx.Pool(workers, initializer=_init_worker, initargs=(domains,)) if workers > 1 else None
    counts: dict[str, dict[str, int]] = {k: {} for k in TAG_KEYS}
    t0, total = time.perf_counter(), 0
    try:
        for split in SPLITS:
            n = sizes.get(split, 0)
            if not n:
                continue
            chunks = [(seed, split, s, min(s + 100, n)) for s in range(0, n, 100)]
            results = pool.imap(_make_chunk, chunks) if pool else map(_make_chunk, chunks)
            lines = [line for chunk in results for line in chunk]
            write_parquet(os.path.join(out, "data", f"{split}-00000-of-00001.parquet"), lines)
            for line in lines:
                for k in ("domain", "level", "length"):
                    counts[k][line.tags[k]] = counts[k].get(line.tags[k], 0) + 1
                for op in line.tags["degradations"].split("+"):
                    counts["degradations"][op] = counts["degradations"].get(op, 0) + 1
            total += n
    finally:
        if pool:
            pool.close()
            pool.join()
    seconds = time.perf_counter() - t0
    assert _WORKER is not None
    all_faces = tuple(dict.fromkeys(f for d in domains for f in _WORKER.faces[d]))
    summary = {
        "preset": "domains", "domains": list(domains), "seed": seed,
        "sizes": {s: sizes.get(s, 0) for s in SPLITS}, "workers": workers,
        "fonts": {d: [f.name for f in _WORKER.faces[d]] for d in domains},
        "font_files": font_files(all_faces), "renderer": renderer_versions(),
        "tag_counts": {k: dict(sorted(v.items())) for k, v in counts.items()},
    }
    return write_generation_json(out, summary, total=total, seconds=seconds, workers=workers)


def sample_grid(path: str, *, per_domain: int = 6, seed: int = 0) -> str:
    """Save a PNG grid: one column per domain, ``per_domain`` lines each (levels clean..hard cycling)."""
    gen = DomainGenerator()
    cells = {d: [Image.open(io.BytesIO(gen.make(seed, "test", i, domain=d, level=LEVEL_NAMES[i % 4]).image))
                 for i in range(per_domain)] for d in DOMAINS}
    col_w = min(420, max(im.width for ims in cells.values() for im in ims))
    row_h = 48
    label_h = 30
    grid = Image.new("RGB", (col_w * len(DOMAINS) + 10 * (len(DOMAINS) + 1), label_h + per_domain * (row_h + 6) + 6),
                     (235, 235, 235))
    draw = ImageDraw.Draw(grid)
    label_face = gen.faces["screenshot"][0]
    font = _pil_font(label_face.path, label_face.index, 18)
    for c, d in enumerate(DOMAINS):
        x = 10 + c * (col_w + 10)
        draw.text((x, 4), d, font=font, fill=(0, 0, 0))
        for r, im in enumerate(cells[d]):
            if im.width > col_w:  # keep the aspect ratio, shrink to the column
                im = im.resize((col_w, max(1, round(im.height * col_w / im.width))), Image.BILINEAR)
            if im.height > row_h:
                im = im.resize((max(1, round(im.width * row_h / im.height)), row_h), Image.BILINEAR)
            grid.paste(im, (x, label_h + 6 + r * (row_h + 6)))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    grid.save(path, optimize=True)
    return path


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; see the module docstring."""
    p = argparse.ArgumentParser(prog="python -m data.domains", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="output folder (parquet files go to OUT/data/)")
    p.add_argument("--domains", default=",".join(DOMAINS), help=f"comma-separated subset of {','.join(DOMAINS)}")
    p.add_argument("--train", type=int, default=10000)
    p.add_argument("--val", type=int, default=1000)
    p.add_argument("--test", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="processes (output is identical for any value)")
    p.add_argument("--grid", help="instead of a dataset, save a PNG grid of sample lines per domain here")
    a = p.parse_args(argv)
    if a.grid:
        print(f"wrote {sample_grid(a.grid, seed=a.seed)}")
        return 0
    if not a.out:
        p.error("--out is required (or --grid PATH)")
    domains = tuple(d.strip() for d in a.domains.split(",") if d.strip())
    s = generate_domains(a.out, {"train": a.train, "val": a.val, "test": a.test}, seed=a.seed, domains=domains,
                         workers=a.workers)
    print(f"wrote {sum(s['sizes'].values())} lines {s['sizes']} of {','.join(domains)} to {a.out}/data in "
          f"{s['seconds']:.1f} s: {s['lines_per_s']} lines/s ({s['lines_per_s_per_worker']} per worker, "
          f"{a.workers} worker(s)); tags {s['tag_counts']['domain']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
